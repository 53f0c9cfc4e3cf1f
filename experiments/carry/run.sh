#!/usr/bin/env bash
# Runs a command on a machine without network under a time limit, with the carried wheels of
# .whl/ (experiments/carry/wheels.sh made them) installed into a folder of their own first.
#
#   OUT=DIR bash experiments/carry/run.sh python -m experiments.gpu_check
#   OUT=DIR bash experiments/carry/run.sh python -m experiments.kernel_bench --output_dir=DIR
#
# CARRY_SITE: where the wheels go (default /tmp/site); CARRY_TOTAL_S: the limit of the whole
# command in seconds, install included (default 450). The command gets what the install left as
# its hard limit, and CARRY_BUDGET_S (that limit less 45 s) to share among its parts; its output
# is also written to $OUT/log.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-carry_out}
mkdir -p "$out"
export OUT=$out
site=${CARRY_SITE:-/tmp/site}
start=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "carried wheels: $(ls .whl/*.whl | wc -l), $(( $(cat .whl/*.whl | wc -c) / 1048576 )) MiB"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl 2>&1 | tail -5
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export CARRY_SITE=$site
  echo "installed into $site in $(( $(date +%s) - start )) s"
else
  echo "no .whl/ here: running with what this machine has (run experiments/carry/wheels.sh first)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU.
command -v nvidia-smi > /dev/null && nvidia-smi \
  --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
limit=$(( ${CARRY_TOTAL_S:-450} - ($(date +%s) - start) ))
export CARRY_BUDGET_S=$(( limit - 45 ))
echo "time limit ${limit} s, budget ${CARRY_BUDGET_S} s: $*"
timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
echo "exit $rc after $(( $(date +%s) - start )) s; results in $out"
exit "$rc"
