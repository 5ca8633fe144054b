#!/usr/bin/env bash
# Runs (or resumes) the campaign's studies in the order experiments/PROTOCOL.md fixes, in one sweep whose two
# workers take the studies in turn: a worker with nothing left to start in one study takes the next study's points
# rather than idle beside the other's last trial, and a study starts once the learning-rate study it reads is
# complete. Each study resumes where it stopped, so rerunning this script after an interruption loses at most the
# epochs that were in progress (none after `pkill -USR1 -f continuum.sweep`, which stops each worker once its epoch
# in progress is saved).
#   bash experiments/campaign/run.sh               the pilot: pilot_lr, pilot, pilot_long
#   bash experiments/campaign/run.sh ablations     every ablation, each learning-rate study before its study (set the
#                                                  epochs and seeds the pilot chose in their files first)
#   bash experiments/campaign/run.sh STUDY ...     these studies, in this order (after a failed length check and the
#                                                  ablations: pilot_longer, the check from 15 to 45 epochs)
#   bash experiments/campaign/run.sh ... -- OPTION ...
#                                                  sweep options for every study, such as a campaign of its own on a
#                                                  GPU: -- --out results/gpu_campaign --device cuda --epochs 30 (each
#                                                  file's storage and learning-rate study follow --out)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python}
pilot=(pilot_lr pilot pilot_long)
ablations=()
for name in spectrum_params spectrum_flops order mid_act_depthwise mid_act_deep residual xception_vs_inception; do
    ablations+=("${name}_lr" "$name")
done
ablations+=(search search_retrain)  # the search's rate is the pilot's; the retrain trains its front again
named=()
while (($#)) && [[ $1 != -- ]]; do
    named+=("$1")
    shift
done
options=("${@:2}")  # after --
case "${named[0]:-}" in
    "") studies=("${pilot[@]}") ;;
    ablations) studies=("${ablations[@]}") ;;
    *) studies=("${named[@]}") ;;
esac
configs=()
for study in "${studies[@]}"; do
    configs+=(--config "experiments/campaign/$study.toml")
done
echo "$(date -Is) start ${studies[*]} (load: $(cut -d' ' -f1-3 /proc/loadavg))"
"$python" -m continuum.sweep "${configs[@]}" "${options[@]}" --quiet
echo "$(date -Is) done ${studies[*]}"
