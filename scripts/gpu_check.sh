#!/usr/bin/env bash
# The CUDA checks that need a GPU, as one command on a lent GPU machine (see
# ../shared/gpu/README.md), within ONE deadline of 540 s from its start, the most important
# first, so that whatever it reaches is reported:
#   1. the environment (GPU, nvcc, PyCUDA, compute-sanitizer), and a parallel build of the
#      trainers and harnesses the later checks run
#   2. the PyCUDA kernel tests, tests/test_cuda_kernels.py (pytest -n auto with pytest-xdist)
#   3. llmgen verify --target cuda: test-odd in fp32 and bf16, gpt2-124m sizes with 2 layers
#      at T=64 in bf16 (in parallel)
#   4. gpt2-124m bf16 at B=16, T=1024: step-1 and last loss, median ms/step, tok/s, peak
#      device memory (nvidia-smi) and the trainer's own figure against `llmgen info`; a
#      cuBLASLt fallback note, a non-finite loss or a figure that disagrees is a failure
#   5. compute-sanitizer memcheck of a few steps of a small bf16 trainer, where it runs
#   6. step 4 at B=64, then the other gpu-marked tests (tests/test_cuda_generate.py: generation
#      with the cache and its speed; tests/test_cuda_verify.py), as time allows
# It writes two files into the output folder (the first argument, else $OUT, else
# build/gpu-check): summary.txt, the table it prints last, and logs.tar.gz, every log.
# Exit status: 0 all reached checks passed, 1 a check failed, 2 no GPU (nothing checked).
#
# On the machine with the checkout, once:
#   mkdir -p .whl && cp ../shared/gpu/wheels/*.whl .whl/      (.whl/ is git-ignored)
# then through the device tool (it copies the checkout, .whl/ given as carried):
#   bash scripts/gpu_check.sh "$OUT"
set -uo pipefail
START=$(date +%s)
DEADLINE=$((START + 540))
cd "$(dirname "$0")/.." || exit 1

# The figures of a trainer run from its log, for B x 1024 tokens a step: "loss-of-step-1
# last-loss median-ms tok/s device-bytes-it-allocated cuBLASLt-fallback-notes" ("-" for a
# missing one). `gpu_check.sh --figures LOG B` prints them (for the tests).
figures() {
    local log=$1 B=$2 lines
    lines=$(grep "^step " "$log")
    echo "$lines" | awk -F'|' -v bt=$((B * 1024)) -v planned="$(sed -n 's/.* MiB (\([0-9]*\) bytes) on the GPU.*/\1/p' "$log" | head -1)" \
        -v notes="$(grep -c "^note: cuBLASLt has no algorithm" "$log")" '
        /^step / { split($2, a, " "); loss[++n] = a[2]; split($5, m, " "); if (n > 2) ms[++k] = m[1] }
        END {
            for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (ms[j] + 0 < ms[i] + 0) { t = ms[i]; ms[i] = ms[j]; ms[j] = t }
            med = k ? ms[int((k + 1) / 2)] : "-"
            printf "%s %s %s %s %s %s\n", n ? loss[1] : "-", n ? loss[n] : "-", med,
                   k ? sprintf("%.0f", bt / (med / 1000)) : "-", planned == "" ? "-" : planned, notes
        }'
}
if [ "${1:-}" = --figures ]; then figures "$2" "$3"; exit 0; fi
ROOT=$PWD
OUT=${1:-${OUT:-build/gpu-check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=/tmp/gpu-check
rm -rf "$WORK"
LOGS=$WORK/logs
mkdir -p "$LOGS"
FAILED=0
ROWS=()

left() { echo $((DEADLINE - $(date +%s))); }
# row NAME STATUS DETAIL: one line of the summary (STATUS ok, FAIL, skip or info)
row() {
    ROWS+=("$(printf '%-40s %-5s %s' "$1" "$2" "$3")")
    [ "$2" = FAIL ] && FAILED=1
    printf '[%4ds] %-40s %-5s %s\n' $(($(date +%s) - START)) "$1" "$2" "$3"
}
# budget SECONDS [RESERVE]: the timeout for a step that wants SECONDS, leaving RESERVE (30) for
# the rest; 0 when too little is left to start it
budget() {
    local want=$1 reserve=${2:-30} l
    l=$(($(left) - reserve))
    if [ "$l" -lt 20 ]; then echo 0; elif [ "$l" -lt "$want" ]; then echo "$l"; else echo "$want"; fi
}
finish() {
    {
        echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START)) s of 540; logs in logs.tar.gz"
        printf '%-40s %-5s %s\n' check result detail
        printf '%s\n' "${ROWS[@]}"
    } >"$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
    echo
    cat "$OUT/summary.txt"
    exit "${1:-$FAILED}"
}

# --- llmgen from this checkout (a package of links, no install), PyCUDA from the wheels ----
mkdir -p "$WORK/pkg/llmgen"
for f in gen/*; do ln -sfn "$ROOT/$f" "$WORK/pkg/llmgen/$(basename "$f")"; done
ln -sfn "$ROOT/spec" "$WORK/pkg/llmgen/presets"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl >"$LOGS/pip.log" 2>&1 \
        || echo "pip install of .whl/ failed: see pip.log"
fi
export PYTHONPATH=$WORK/site:$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}

# --- a GPU, or stop here -------------------------------------------------------------------
if ! problem=$(python3 -c "from llmgen.verify import cuda_device_problem as p; print(p() or '')" 2>"$LOGS/python.log"); then
    row "llmgen" FAIL "python3 cannot import it: $(tail -1 "$LOGS/python.log")"
    finish 1
fi
if [ -n "$problem" ]; then
    row "GPU" FAIL "no GPU: $problem"
    echo "no GPU: $problem: nothing to check here (this script runs on a lent GPU machine)"
    finish 2
fi

# --- 1. environment --------------------------------------------------------------------------
if ! command -v nvcc >/dev/null; then  # nvcc: on PATH, in CUDA_HOME, /usr/local/cuda, or pip's wheels
    for d in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin $(python3 -c "import nvidia; print(' '.join(p + '/cu13/bin ' + p + '/cuda_nvcc/bin' for p in nvidia.__path__))" 2>/dev/null); do
        if [ -x "$d/nvcc" ]; then export PATH="$d:$PATH"; break; fi
    done
fi
SANITIZER=$(command -v compute-sanitizer || ls "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/nvcc)")/compute-sanitizer" 2>/dev/null || true)
{
    echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
    echo "== nvcc: $(command -v nvcc)"; nvcc --version 2>&1 | tail -2
    echo "== python"; python3 -c "import sys, numpy; print(sys.version, 'numpy', numpy.__version__)"
    echo "== pycuda"; python3 -c "import pycuda.autoinit, pycuda.driver as d; print(d.Device(0).name(), d.Device(0).compute_capability())" 2>&1
    echo "== pytest-xdist"; python3 -c "import xdist; print(xdist.__version__)" 2>&1
    echo "== compute-sanitizer: ${SANITIZER:-not found}"
    echo "== llmgen"; python3 -c "import llmgen; print(llmgen.__file__)" 2>&1
} >"$LOGS/environment.log" 2>&1
GPU=$(nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader 2>/dev/null | head -1)
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
ARCH=${ARCH:-90}
row "GPU" info "${GPU:-?} (building for sm_$ARCH)"
if command -v nvcc >/dev/null; then row "nvcc" info "$(nvcc --version | tail -1)"; else row "nvcc" FAIL "not found"; finish; fi
if python3 -c "import pycuda.autoinit" 2>/dev/null; then
    row "PyCUDA" info "$(sed -n '/^== pycuda/{n;p}' "$LOGS/environment.log")"
else
    row "PyCUDA" FAIL "does not import (see environment.log; are the wheels in .whl/?)"
fi

# the builds, all at once: the trainer for steps 4-6 and the harnesses verify would build
build() {  # build NAME DIR TARGET EMIT-ARGS...
    local name=$1 dir=$2 target=$3
    shift 3
    python3 -m llmgen emit "$@" -o "$dir" >"$LOGS/build-$name.log" 2>&1 \
        && make -s -C "$dir" "$target" GPU_ARCH="$ARCH" >>"$LOGS/build-$name.log" 2>&1
}
build trainer-bf16 "$WORK/gpt2-124m-bf16" train_gpt2cu --spec gpt2-124m --target cuda --precision bf16 & b1=$!
build verify-test-odd-fp32 "$WORK/verify-test-odd-fp32" test_gpt2cu --spec test-odd --target cuda --precision fp32 --no-tf32 & b2=$!
build verify-test-odd-bf16 "$WORK/verify-test-odd-bf16" test_gpt2cu --spec test-odd --target cuda --precision bf16 --no-tf32 & b3=$!
build verify-gpt2-124m-L2-bf16 "$WORK/verify-gpt2-124m-L2-bf16" test_gpt2cu --spec gpt2-124m --layers 2 --target cuda --precision bf16 --no-tf32 & b4=$!
build sanitize-bf16 "$WORK/sanitize-bf16" train_gpt2cu --spec gpt2-124m --layers 2 --target cuda --precision bf16 & b5=$!
python3 -m llmgen data synthetic --spec gpt2-124m -o "$WORK/data" --tokens 1400000 --val-tokens 20000 >"$LOGS/data.log" 2>&1 & b6=$!
wait $b1; TRAINER_OK=$?
wait $b2 $b3 $b4 $b5 $b6
if [ "$TRAINER_OK" = 0 ]; then row "build gpt2-124m bf16 trainer" ok "sm_$ARCH, $(($(date +%s) - START)) s in"; else
    row "build gpt2-124m bf16 trainer" FAIL "see build-trainer-bf16.log"; fi

# --- 2. the PyCUDA kernel tests ----------------------------------------------------------------
t=$(budget 200)
if [ "$t" -gt 0 ]; then
    xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n auto")
    # shellcheck disable=SC2086
    timeout "$t" python3 -m pytest -q -rfEs $xdist -p no:cacheprovider tests/test_cuda_kernels.py >"$LOGS/pytest-kernels.log" 2>&1
    rc=$?
    summary=$(grep -E "passed|failed|error" "$LOGS/pytest-kernels.log" | tail -1)
    # one skip is expected (fp32 has no conversion kernel); any other means PyCUDA or the GPU is missing
    skips=$(grep "^SKIPPED" "$LOGS/pytest-kernels.log" | grep -vc "fp32 has no conversion kernel")
    if [ $rc = 0 ] && [ "$skips" = 0 ]; then row "PyCUDA kernel tests" ok "$summary"
    else row "PyCUDA kernel tests" FAIL "${summary:-timed out after $t s} (exit $rc, $skips unexpected skips)"; fi
    grep -E "^(FAILED|ERROR)" "$LOGS/pytest-kernels.log" | head -12 | while read -r line; do echo "    $line"; done
else row "PyCUDA kernel tests" skip "out of time"; fi

# --- 3. llmgen verify --target cuda, in parallel ------------------------------------------------
verify() {  # verify NAME PRECISION SPEC-ARGS...
    local name=$1 precision=$2
    shift 2
    # shellcheck disable=SC2086
    timeout "$VT" python3 -m llmgen verify "$@" --target cuda --precision "$precision" \
        --build-dir "$WORK/verify-$name" >"$LOGS/verify-$name.log" 2>&1
    echo $? >"$WORK/verify-$name.rc"
}
VT=$(budget 180)
if [ "$VT" -gt 0 ]; then
    verify test-odd-fp32 fp32 --spec test-odd -t 13 &
    verify test-odd-bf16 bf16 --spec test-odd -t 13 &
    verify gpt2-124m-L2-bf16 bf16 --spec gpt2-124m --layers 2 -b 2 -t 64 --steps 4 &
    wait
    for name in test-odd-fp32 test-odd-bf16 gpt2-124m-L2-bf16; do
        rc=$(cat "$WORK/verify-$name.rc" 2>/dev/null || echo "?")
        last=$(tail -1 "$LOGS/verify-$name.log")
        if [ "$rc" = 0 ]; then row "verify $name" ok "$last"; else
            row "verify $name" FAIL "exit $rc: $last"
            grep -E " FAIL$" "$LOGS/verify-$name.log" | head -6 | while read -r line; do echo "    $line"; done
        fi
    done
else row "verify --target cuda" skip "out of time"; fi

# --- 4. (and 6.) the speed and memory of gpt2-124m bf16 at T=1024 -------------------------------
bench() {  # bench B STEPS
    local B=$1 steps=$2 name="gpt2-124m bf16 B=$1 T=1024" log="$LOGS/bench-B$1.log" t
    t=$(budget $((40 + steps * 3)) "${3:-30}")
    if [ "$TRAINER_OK" != 0 ]; then row "$name" FAIL "no trainer (see build-trainer-bf16.log)"; return; fi
    if [ "$t" = 0 ]; then row "$name" skip "out of time"; return; fi
    : >"$WORK/mem-B$B.txt"
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >>"$WORK/mem-B$B.txt" 2>/dev/null; sleep 0.5; done) &
    local sampler=$!
    timeout "$t" "$WORK/gpt2-124m-bf16/train_gpt2cu" -i "$WORK/data/train_*.bin" -b "$B" -t 1024 -x "$steps" \
        -v 1000 -s 0 -g 0 >"$log" 2>&1
    local rc=$?
    kill $sampler 2>/dev/null; wait $sampler 2>/dev/null
    local first last ms tps planned notes peak info
    read -r first last ms tps planned notes <<<"$(figures "$log" "$B")"
    peak=$(sort -n "$WORK/mem-B$B.txt" | tail -1)
    info=$(python3 -m llmgen info --spec gpt2-124m --target cuda --precision bf16 -b "$B" -t 1024 2>/dev/null \
           | sed -n 's/.*MiB (\([0-9,]*\) bytes).*/\1/p' | tr -d ,)
    local detail="loss $first -> $last, $ms ms/step (median of steps 3..$steps), $tps tok/s, peak ${peak:-?} MiB used"
    if [ $rc != 0 ]; then row "$name" FAIL "exit $rc: $(tail -1 "$log")"
    elif [ "$notes" != 0 ]; then row "$name" FAIL "$notes cuBLASLt fallback note(s): $(grep -m1 '^note: cuBLASLt' "$log")"
    elif ! awk -v a="$first" -v b="$last" 'BEGIN { exit !(a == a + 0 && b == b + 0 && a < 20 && b < 20) }'; then
        row "$name" FAIL "non-finite or absurd loss: $detail"
    else row "$name" ok "$detail"; fi
    if [ "$planned" != - ] && [ "$planned" = "$info" ]; then
        row "  device memory B=$B, trainer = info" ok "$((planned / 1048576)) MiB allocated ($planned bytes); peak ${peak:-?} MiB"
    else row "  device memory B=$B, trainer = info" FAIL "trainer says ${planned:-nothing}, llmgen info ${info:-nothing}"; fi
}
bench 16 20

# --- 5. compute-sanitizer memcheck ----------------------------------------------------------
t=$(budget 90 60)
if [ -z "$SANITIZER" ]; then row "compute-sanitizer memcheck" skip "not found"
elif [ "$t" = 0 ]; then row "compute-sanitizer memcheck" skip "out of time"
elif [ ! -x "$WORK/sanitize-bf16/train_gpt2cu" ]; then row "compute-sanitizer memcheck" FAIL "no build (see build-sanitize-bf16.log)"
else
    # 2 layers, T=200 (not a multiple of the attention tiles), two steps
    timeout "$t" "$SANITIZER" --tool memcheck --error-exitcode 9 "$WORK/sanitize-bf16/train_gpt2cu" \
        -i "$WORK/data/train_*.bin" -b 2 -t 200 -x 2 -v 1000 -s 0 -g 0 >"$LOGS/memcheck.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then row "compute-sanitizer memcheck" ok "$(grep -m1 "ERROR SUMMARY" "$LOGS/memcheck.log")"
    elif grep -qi "device not supported\|not supported on this device" "$LOGS/memcheck.log"; then
        row "compute-sanitizer memcheck" skip "not supported on this machine"
    else row "compute-sanitizer memcheck" FAIL "exit $rc: $(grep -m1 "ERROR SUMMARY\|Invalid" "$LOGS/memcheck.log")"; fi
fi

# --- 6. as time allows ---------------------------------------------------------------------------
bench 64 12 20
t=$(budget 150 15)
if [ "$t" -gt 0 ]; then
    timeout "$t" python3 -m pytest -q -rfEs -p no:cacheprovider -m gpu tests/test_cuda_generate.py tests/test_cuda_verify.py \
        >"$LOGS/pytest-gpu-verify.log" 2>&1
    rc=$?
    summary=$(grep -E "passed|failed|error" "$LOGS/pytest-gpu-verify.log" | tail -1)
    if [ $rc = 0 ]; then row "gpu tests: generate, verify" ok "$summary"; else
        row "gpu tests: generate, verify" FAIL "${summary:-timed out after $t s} (exit $rc)"; fi
    speed=$(grep -m1 -o "gpt2-124m bf16, batch 1, 512 tokens: .*" "$LOGS/pytest-gpu-verify.log")
    if [ -n "$speed" ]; then row "  generation speed" info "$speed"; fi
else row "gpu tests: generate, verify" skip "out of time"; fi
finish
