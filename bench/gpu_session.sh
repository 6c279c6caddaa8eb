#!/usr/bin/env bash
# Everything the GPU throughput figures need, in one run on a GPU machine (sized for 10 minutes; not yet run
# there): the CUDA tests, then each benchmark, each into its own file under $OUT (default bench-out/). From the
# project root, with ray, mlflow, optuna and torch-fidelity importable (../shared/device/README.md).
set -u
out=${OUT:-bench-out}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
run() {  # run NAME COMMAND...: output to $out/NAME.txt, its exit status and wall time appended
    local name=$1 start=$SECONDS
    shift
    "$@" > "$out/$name.txt" 2>&1
    echo "exit $? after $((SECONDS - start)) s" >> "$out/$name.txt"
}
run gpu_tests python -m pytest -q -m gpu tests
# device auto: on a GPU this is the compiled (CUDA graphs) trial against eager
run compiled_trial_test python -m pytest -q tests/test_train.py -k compiled_trial_matches_eager
run evaluation python bench/evaluation.py --device cuda
run trial_throughput \
    python bench/trial_throughput.py --device cuda --iters 200 --n-dis 5 --inception-images 5000
run packing python bench/packing.py --device cuda --packs 1 4 16 64 --profile 64 --fid-images 5000
run iteration_time python bench/iteration_time.py --device cuda --n-dis 5
