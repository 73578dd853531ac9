#!/usr/bin/env bash
# Run the GPU checks in one go on a machine with a CUDA GPU and print a summary.
#
# Usage, from the repository root after scripts/install.sh:
#   bash benchmarks/gpu_checks.sh [OUTPUT_DIR]
# OUTPUT_DIR (default gpu_checks) receives one log per check and the JSON of
# gpu_throughput.py. The checks, in order of cost:
#   1. the CUDA tests of the compiled AdamPower step and of downstream scoring
#      (tests/trainers);
#   2. benchmarks/power_step.py --device cuda at 20M and 200M float32 parameters;
#   3. benchmarks/gpu_throughput.py (LLaMA-0.2B 200 steps, ResNet-34 one epoch).
# A failing check does not stop the later ones; the exit status is that of the
# last failure, or 0.
set -uo pipefail

output_dir="${1:-gpu_checks}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$output_dir"
status=0

run_check() {
    local name="$1"
    shift
    echo "== $name: $*"
    local started=$SECONDS
    if "$@" >"$output_dir/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - started)) s"
    else
        status=$?
        echo "   failed with status $status in $((SECONDS - started)) s; last lines:"
        tail -n 20 "$output_dir/$name.log" | sed 's/^/   | /'
    fi
}

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no CUDA device; run this script on a machine with a GPU" >&2
    exit 2
fi
"$python" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"

run_check cuda_tests "$python" -m pytest -q -rs tests/trainers/test_compiled_step.py \
    tests/trainers/test_downstream.py
run_check power_step_20m "$python" benchmarks/power_step.py --device cuda
run_check power_step_200m "$python" benchmarks/power_step.py --device cuda \
    --params-millions 200
run_check gpu_throughput "$python" benchmarks/gpu_throughput.py \
    --json "$output_dir/gpu_throughput.json"

for name in power_step_20m power_step_200m; do
    echo "== $name table"
    sed -n '/^optimizer step/,/^$/p' "$output_dir/$name.log"
done
echo "== gpu_throughput summary"
tail -n 15 "$output_dir/gpu_throughput.log"
exit "$status"
