#!/usr/bin/env bash
# The GPU check of evonas: what a CPU machine cannot show, in about six minutes on one GPU.
#
#     benchmarks/gpu_check.sh [OUT_DIR]        # default benchmarks/results/gpu_check
#
# From the repository root, on a machine with CUDA and a CUDA build of torch in .venv
# (PYTHON=... for another interpreter). Four parts, each logged to OUT_DIR/<part>.log and
# each command under a time limit; a part that fails does not stop the next ones, and the
# script exits 1 if any failed:
#   cuda_tests   the tests that skip without CUDA (pytest -k cuda); none may skip
#   search       a short search on the synthetic set, four evaluations per GPU
#                (--gpus-per-eval 0.25) under a gpu-h budget
#   train        `evonas train` on that search's run folder with --gpus-per-trial 0.5
#                --bf16 --channels-last
#   layer_speed  benchmarks/layer_speed.py on the GPU: every zoo layer eager, and three
#                under torch.compile
# OUT_DIR/summary.json holds each part's exit status and seconds, and the GPU and torch
# versions; the search's leaderboard (search_top.txt), the full-training leaderboard
# (fulltrain_leaderboard.json) and the layer timings (layer_speed*.json) sit beside it.
# Without CUDA it stops at once with one line saying so (exit 2). With EVONAS_DATA_DIR set
# the layer timings use CIFAR-10 from there, as the CPU figures in BENCHMARKS.md do; else
# synthetic images of the same shape.
#
# GPU_CHECK_REHEARSAL=cpu runs the same commands with CPU flags and tiny sizes, to check
# the script where no GPU is; its figures mean nothing.
set -euo pipefail

OUT_DIR=${1:-benchmarks/results/gpu_check}
PYTHON=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RUN="$WORK/search"

if [[ ${GPU_CHECK_REHEARSAL:-} == cpu ]]; then
    CUDA_TESTS_MAY_SKIP=1
    LIMIT_SCALE=4  # a shared CPU runs even tiny trials slower than a GPU runs these
    SEARCH_FLAGS=(--budget 0.005cpu-h --workers 2 --cpus-per-eval 1)
    TRAIN_FLAGS=(--device cpu --cpus-per-trial 1 --bf16 --channels-last --steps 4)
    SPEED_FLAGS=(--device cpu --steps 1 --rounds 1 --layers bn_relu)
    COMPILE_FLAGS=(--device cpu --steps 1 --rounds 1 --layers bn_relu --compile)
else
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        echo "gpu_check: no CUDA device visible to torch ($PYTHON): run it on a GPU machine" \
             "with a CUDA build of torch (PYTHON=... names another interpreter)" >&2
        exit 2
    fi
    CUDA_TESTS_MAY_SKIP=0
    LIMIT_SCALE=1
    # 0.02 gpu-h is 72 GPU-seconds: about 290 seconds of evaluations at a quarter GPU each.
    SEARCH_FLAGS=(--budget 0.02gpu-h --workers 4 --gpus-per-eval 0.25 --cpus-per-eval 2)
    TRAIN_FLAGS=(--gpus-per-trial 0.5 --cpus-per-trial 2 --bf16 --channels-last --steps 200)
    SPEED_FLAGS=(--device cuda --steps 10 --rounds 5)
    COMPILE_FLAGS=(--device cuda --steps 10 --rounds 5 --compile
                   --layers bn_relu gn_relu evonorm_s0)
fi
if [[ -n ${EVONAS_DATA_DIR:-} ]]; then
    SPEED_DATA=(--dataset cifar10 --data-dir "$EVONAS_DATA_DIR")
else
    SPEED_DATA=(--dataset synthetic)
fi

mkdir -p "$OUT_DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PARTS=()
FAILED=0

# part NAME: runs the function NAME, logs its output, records its status and seconds.
part() {
    local name=$1 start status=0
    echo "gpu_check: $name"
    start=$(date +%s)
    "$name" >"$OUT_DIR/$name.log" 2>&1 || status=$?
    PARTS+=("\"$name\": {\"status\": $status, \"seconds\": $(($(date +%s) - start))}")
    if ((status != 0)); then
        FAILED=1
        echo "gpu_check: $name failed with status $status; see $OUT_DIR/$name.log" >&2
    fi
}

# limit SECONDS COMMAND...: a hung command costs at most SECONDS of scarce device time.
limit() {
    timeout --kill-after=20 "$(($1 * LIMIT_SCALE))" "${@:2}"
}

cuda_tests() {
    local out status=0
    out=$(limit 90 "$PYTHON" -m pytest -p no:cacheprovider -q -rs -k cuda \
        tests/test_interpreter.py tests/test_proxy_train.py) || status=$?
    echo "$out"
    ((status == 0)) || return "$status"
    # On a GPU a skipped CUDA test is a failed check: it did not run.
    ((CUDA_TESTS_MAY_SKIP)) || ! grep -q skipped <<<"$out"
}

search() {
    limit 150 "$PYTHON" -m evonas search --space norm_act --dataset synthetic --seed-zoo \
        --out "$RUN" --report-every 3600 "${SEARCH_FLAGS[@]}" &&
        "$PYTHON" -m evonas top "$RUN" -n 10 >"$OUT_DIR/search_top.txt"
}

train() {
    limit 150 "$PYTHON" -m evonas train "$RUN" --top 1 --baselines bn_relu,evonorm_s0 \
        --archs resnet20 --batch-sizes 128 --seeds 1 --trials-per-layer 1 --reports 2 \
        "${TRAIN_FLAGS[@]}" &&
        cp "$RUN/fulltrain/leaderboard.json" "$OUT_DIR/fulltrain_leaderboard.json"
}

layer_speed() {
    limit 90 "$PYTHON" benchmarks/layer_speed.py "${SPEED_DATA[@]}" "${SPEED_FLAGS[@]}" \
        --out "$OUT_DIR/layer_speed.json" &&
        limit 180 "$PYTHON" benchmarks/layer_speed.py "${SPEED_DATA[@]}" "${COMPILE_FLAGS[@]}" \
            --out "$OUT_DIR/layer_speed_compile.json"
}

part cuda_tests
part search
part train
part layer_speed

"$PYTHON" - "$OUT_DIR/summary.json" "{$(IFS=,; echo "${PARTS[*]}")}" <<'PY'
import json, platform, sys, torch
cuda = torch.cuda.is_available()
summary = {"parts": json.loads(sys.argv[2]), "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "python": platform.python_version()}
with open(sys.argv[1], "w") as f:
    json.dump(summary, f, indent=1)
PY
echo "gpu_check: figures in $OUT_DIR"
exit "$FAILED"
