#!/usr/bin/env bash
# Runs (or resumes) the campaign's studies in the order experiments/PROTOCOL.md fixes; each step resumes where it
# stopped, so rerunning this script after an interruption loses at most the trials that were in progress.
#   bash experiments/campaign/run.sh [STUDY ...]     (default: every study, in order)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python}
studies=("$@")
[ ${#studies[@]} -gt 0 ] || studies=(pilot_lr pilot pilot_long)
for study in "${studies[@]}"; do
    echo "$(date -Is) start $study (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$python" -m continuum.sweep --config "experiments/campaign/$study.toml" --quiet
    echo "$(date -Is) done $study"
done
