#!/usr/bin/env bash
# The GPU check in one command, on a GPU machine without network (see experiments/gpu_check.py):
# installs the carried wheels of .whl/ (experiments/gpu_wheels.sh made them) into a folder of its
# own, prints their size, then runs every part into $OUT (default gpu_check_out/) under a time limit.
#
#   OUT=DIR bash experiments/gpu_check.sh [gpu_check.py flags, e.g. --parts=kernels,kernel_timing]
#
# GPU_CHECK_SITE: where the wheels go (default /tmp/site); GPU_CHECK_TOTAL_S: the limit of the whole
# command in seconds (default 450).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export OUT=$out
site=${GPU_CHECK_SITE:-/tmp/site}
start=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "carried wheels: $(ls .whl/*.whl | wc -l), $(( $(cat .whl/*.whl | wc -c) / 1048576 )) MiB"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl 2>&1 | tail -5
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export GPU_CHECK_SITE=$site
  echo "installed into $site in $(( $(date +%s) - start )) s"
else
  echo "no .whl/ here: running with what this machine has (run experiments/gpu_wheels.sh first)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
# The whole command stays under 8 minutes: the Python run gets what the install left of 450 s as
# its hard limit, and 45 s less as the budget its parts share (unless --budget_s is given).
limit=$(( ${GPU_CHECK_TOTAL_S:-450} - ($(date +%s) - start) ))
budget=()
[[ " $* " == *" --budget_s"* ]] || budget=(--budget_s "$(( limit - 45 ))")
echo "time limit ${limit} s, budget ${budget[1]:-given} s"
timeout --kill-after=10 "$limit" python3 -m experiments.gpu_check --out "$out" "${budget[@]}" "$@" 2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ -f "$out/results.json" ]; then  # Killed or failed: the table from what is there.
  timeout 60 python3 -m experiments.gpu_check --replot "$out" > /dev/null 2>&1 || true
fi
echo "gpu_check exit $rc after $(( $(date +%s) - start )) s; results in $out"
exit "$rc"
