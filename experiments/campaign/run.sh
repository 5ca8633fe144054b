#!/usr/bin/env bash
# Runs (or resumes) the campaign's studies in the order experiments/PROTOCOL.md fixes; each step resumes where it
# stopped, so rerunning this script after an interruption loses at most the epochs that were in progress (none
# after `pkill -USR1 -f continuum.sweep`, which stops each worker once its epoch in progress is saved).
#   bash experiments/campaign/run.sh               the pilot: pilot_lr, pilot, pilot_long
#   bash experiments/campaign/run.sh ablations     every ablation, each learning-rate study before its study (set the
#                                                  epochs and seeds the pilot chose in their files first)
#   bash experiments/campaign/run.sh STUDY ...     these studies, in this order
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python}
pilot=(pilot_lr pilot pilot_long)
ablations=()
for name in spectrum_params spectrum_flops order mid_act_depthwise mid_act_deep residual xception_vs_inception; do
    ablations+=("${name}_lr" "$name")
done
ablations+=(search search_retrain)  # the search's rate is the pilot's; the retrain trains its front again
case "${1:-}" in
    "") studies=("${pilot[@]}") ;;
    ablations) studies=("${ablations[@]}") ;;
    *) studies=("$@") ;;
esac
for study in "${studies[@]}"; do
    echo "$(date -Is) start $study (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$python" -m continuum.sweep --config "experiments/campaign/$study.toml" --quiet
    echo "$(date -Is) done $study"
done
