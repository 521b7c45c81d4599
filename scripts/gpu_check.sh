#!/usr/bin/env bash
# The CUDA checks that need a GPU, in one command on a lent GPU machine (see shared/gpu/README.md):
# the gpu-marked tests (PyCUDA kernel tests, verify --target cuda, CUDA trainer runs),
# `llmgen verify --target cuda` in fp32 and bf16, and the speed of gpt2-124m at B=16, T=1024.
# It prints a short table last and leaves every log under $OUT (or build/gpu-check).
#
# On the machine with the checkout, first:
#   mkdir -p .whl && cp ../shared/gpu/wheels/*.whl .whl/     (.whl/ is git-ignored)
# then run, through the device tool, carrying .whl:
#   bash scripts/gpu_check.sh            (everything, about 5-8 minutes)
#   bash scripts/gpu_check.sh tests      (or: verify, bench: one part)
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
ROOT=$PWD
declare -a TABLE=()
row() { TABLE+=("$(printf '%-46s %s' "$1" "$2")"); }

# --- PyCUDA from the wheels, llmgen from this checkout (no build step: a package of links)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-site .whl/*.whl >"$OUT/pip.log" 2>&1 \
        || echo "pip install of .whl/ failed: see $OUT/pip.log"
fi
mkdir -p /tmp/gpu-pkg/llmgen
for f in gen/*; do ln -sfn "$ROOT/$f" "/tmp/gpu-pkg/llmgen/$(basename "$f")"; done
ln -sfn "$ROOT/spec" /tmp/gpu-pkg/llmgen/presets
export PYTHONPATH=/tmp/gpu-site:/tmp/gpu-pkg${PYTHONPATH:+:$PYTHONPATH}

# --- nvcc: on PATH, in CUDA_HOME, in /usr/local/cuda, or in pip's nvidia wheels
if ! command -v nvcc >/dev/null; then
    for d in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin $(python3 -c "import nvidia; print(' '.join(p + '/cu13/bin ' + p + '/cuda_nvcc/bin' for p in nvidia.__path__))" 2>/dev/null); do
        if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
    done
fi
{
    echo "== nvidia-smi"; nvidia-smi 2>&1 | head -15
    echo "== nvcc: $(command -v nvcc)"; nvcc --version 2>&1 | tail -2
    echo "== pycuda"; python3 -c "import pycuda.autoinit, pycuda.driver as d; print(d.Device(0).name(), d.Device(0).compute_capability())" 2>&1
    echo "== llmgen"; python3 -c "import llmgen, sys; print(llmgen.__file__, sys.version)" 2>&1
    echo "== make cuda-info"; python3 -m llmgen emit --spec test-tiny --target cuda -o /tmp/gpu-info >/dev/null && make -s -C /tmp/gpu-info cuda-info
} 2>&1 | tee "$OUT/environment.log"
row "device" "$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -1)"

# --- the gpu-marked tests
if [ "$PART" = all ] || [ "$PART" = tests ]; then
    timeout 330 python3 -m pytest -q -rfs -m gpu tests/ >"$OUT/pytest-gpu.log" 2>&1
    rc=$?
    row "pytest -m gpu (exit $rc)" "$(tail -1 "$OUT/pytest-gpu.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/pytest-gpu.log" | head -20 | while read -r line; do echo "  $line"; done
fi

# --- llmgen verify --target cuda
if [ "$PART" = all ] || [ "$PART" = verify ]; then
    for case in "test-odd -t 13" "gpt2-124m --layers 2 -b 2 -t 64 --steps 4"; do
        for precision in fp32 bf16; do
            name="verify ${case%% *} $precision"
            log="$OUT/verify-${case%% *}-$precision.log"
            # shellcheck disable=SC2086
            timeout 150 python3 -m llmgen verify --spec $case --target cuda --precision "$precision" \
                --build-dir "/tmp/gpu-verify-${case%% *}-$precision" >"$log" 2>&1
            row "$name (exit $?)" "$(tail -1 "$log")"
        done
    done
fi

# --- speed: gpt2-124m, B=16, T=1024
if [ "$PART" = all ] || [ "$PART" = bench ]; then
    python3 -m llmgen data synthetic --spec gpt2-124m -o /tmp/gpu-data --tokens 400000 --val-tokens 40000 >"$OUT/data.log" 2>&1
    for precision in bf16 fp32; do
        dir=/tmp/gpu-bench-$precision
        log="$OUT/bench-gpt2-124m-$precision.log"
        steps=$([ "$precision" = bf16 ] && echo 20 || echo 8)
        if python3 -m llmgen emit --spec gpt2-124m --target cuda --precision "$precision" -o "$dir" >/dev/null \
            && make -s -C "$dir" train_gpt2cu >"$OUT/build-gpt2-124m-$precision.log" 2>&1; then
            timeout 200 "$dir/train_gpt2cu" -i '/tmp/gpu-data/train_*.bin' -j '/tmp/gpu-data/val_*.bin' \
                -b 16 -t 1024 -x "$steps" -v 1000 -m 2 -s 0 >"$log" 2>&1
            rc=$?
            # median tok/s over the steps after the first two
            tps=$(grep "^step " "$log" | awk -F'|' 'NR > 2 { split($6, a, " "); print a[1] }' | sort -n \
                  | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "-" }')
            ms=$(grep "^step " "$log" | awk -F'|' 'NR > 2 { split($5, a, " "); print a[1] }' | sort -n \
                 | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "-" }')
            row "gpt2-124m B=16 T=1024 $precision (exit $rc)" "$tps tok/s, $ms ms/step (median)"
        else
            row "gpt2-124m $precision build" "FAILED: see $OUT/build-gpt2-124m-$precision.log"
        fi
    done
fi

echo
echo "== summary (logs in $OUT)"
printf '%s\n' "${TABLE[@]}" | tee "$OUT/summary.txt"
