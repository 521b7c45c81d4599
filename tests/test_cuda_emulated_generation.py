"""The CUDA trainer's generation with its cache of keys and values, end to end without a GPU:
the emitted harness (test_gpt2.cu, which includes train_gpt2.cu) is compiled with g++ against
the CPU emulator of tests/test_cuda_emulated.py and a stand-in CUDA runtime whose device
memory is host memory, so that its host code (the prefill through the batch forward, the
cache's fill, the decode steps, the refill past the window) runs with its kernels.

- Each `kernel<<<grid, block>>>(args);` becomes a call of the emulator's launch; the CUDA
  runtime calls the trainer makes (cudaMalloc, cudaMemcpy, cudaMemset, ...) are small
  functions here. New device memory is 0xFF bytes (NaN), so a read of what was never written
  shows. The matmuls are the tiled kernel's (--matmul tiled: no cuBLASLt here).
- test-odd (2 layers, 3 heads of 16) with a context of 160, past one block of keys of the
  attention over the cache (DECODE_CHUNK, 128), with random weights large enough for sharp
  attention and logits, in fp32 and bf16 (where the batch forward's attention is the
  tensor-core kernels, their mma and ldmatrix emulated).
What it shows: cached greedy tokens equal the whole-window ones, within the window and past
it; cached logits equal the last row of a whole forward at every position. What it cannot:
anything of cuBLASLt, of the GPU's speed or of real concurrency (see test_cuda_emulated.py).
"""

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llmgen import spec as specs
from llmgen.emit import cuda_build, emit
from llmgen.fileio import write_model
from llmgen.reference import param_shapes
from llmgen.verify import TOLERANCES

from test_cuda_emulated import CUDA_INCLUDE, CXX, EMULATOR_H, REPLACEMENTS, needs_cxx

# The CUDA runtime as the trainer uses it, on the host: definitions of the functions that
# cuda_runtime_api.h declares (the emulator's cuda_bf16.h includes it).
RUNTIME = r"""
cudaError_t cudaMalloc(void** p, size_t bytes) {
    size_t rounded = (bytes + 255) / 256 * 256;
    *p = aligned_alloc(256, rounded > 0 ? rounded : 256);
    if (*p == NULL) { return cudaErrorMemoryAllocation; }
    memset(*p, 0xFF, rounded);  // NaN in fp32 and bf16: what is read before it is written shows
    return cudaSuccess;
}
cudaError_t cudaFree(void* p) { free(p); return cudaSuccess; }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    (void)kind;
    memmove(dst, src, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) { memset(p, value, bytes); return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { (void)d; return cudaSuccess; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    (void)d;
    memset(p, 0, sizeof(*p));
    strcpy(p->name, "CUDA emulator");
    p->major = 9;
    return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { (void)e; return "error (emulated)"; }
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) { *free_bytes = *total = 0; return cudaSuccess; }
"""


def launches(src: str) -> str:
    """Every `name<<<grid, block>>>(args);` as `emu::launch(dim3(grid), dim3(block), [&] { name(args); });`."""
    out, at = [], 0
    for m in re.finditer(r"(\w+)<<<", src):
        if m.start() < at:
            continue
        close = src.index(">>>", m.end())
        shape = src[m.end():close]
        depth, split = 0, None
        for i, ch in enumerate(shape):
            depth += ch in "(" or -(ch in ")")
            if ch == "," and depth == 0:
                split = i
        assert split is not None and src[close + 3] == "(", shape
        depth, i = 0, close + 3
        while True:  # the argument list's closing parenthesis
            depth += src[i] == "(" or -(src[i] == ")")
            if depth == 0:
                break
            i += 1
        assert src[i + 1] == ";", src[m.start():i + 2]
        out.append(src[at:m.start()])
        out.append(f"emu::launch(dim3({shape[:split].strip()}), dim3({shape[split + 1:].strip()}), "
                   f"[&] {{ {m.group(1)}{src[close + 3:i + 1]}; }});")
        at = i + 2
    out.append(src[at:])
    return "".join(out)


# Several rows at once, each with tokens of its own, through the sampler's interface: at each
# length i = 1..N the cached logits of every row (gpt2_next_logits, seeing the last W tokens)
# against the last row of a forward over the same tokens. Prints "i error" per step, the
# largest difference relative to the largest logit over the rows.
ROWS_MAIN = r"""
int main(int argc, char** argv) {
    if (argc != 5) { die("usage: rows model.bin R W N"); }
    int R = atoi(argv[2]), W = atoi(argv[3]), N = atoi(argv[4]);
    int* tokens = (int*)malloc_check((size_t)R * N * sizeof(int));  // (R, N): a pattern of each row's own
    for (int r = 0; r < R; r++) {
        for (int i = 0; i < N; i++) { tokens[r * N + i] = (int)((r * 31 + i * 17 + i * i * (r + 1)) % VOCAB_SIZE); }
    }
    GPT2 model;
    gpt2_alloc(&model, 1, W);
    gpt2_load(&model, argv[1]);
    KVCache cache;
    kvcache_alloc(&cache, R, W);
    float* cached = (float*)malloc_check((size_t)R * PADDED_VOCAB_SIZE * sizeof(float));
    for (int i = 1; i <= N; i++) {
        int start = i > W ? i - W : 0;
        memcpy(cached, gpt2_next_logits(&model, &cache, tokens, N, start, i), (size_t)R * PADDED_VOCAB_SIZE * sizeof(float));
        float diff = 0.0f, scale = 1e-30f;
        for (int r = 0; r < R; r++) {
            gpt2_forward(&model, tokens + r * N + start, NULL, 1, i - start);
            const float* full = gpt2_logits_row(&model, i - start - 1);
            for (int v = 0; v < VOCAB_SIZE; v++) {
                diff = fmaxf(diff, fabsf(cached[(size_t)r * PADDED_VOCAB_SIZE + v] - full[v]));
                scale = fmaxf(scale, fabsf(full[v]));
            }
        }
        printf("%d %.3e\n", i, diff / scale);
    }
    kvcache_free(&cache);
    gpt2_free(&model);
    free(cached);
    free(tokens);
    return 0;
}
"""


def emulated_source(out: Path, main: str | None = None) -> str:
    """test_gpt2.cu, with the train_gpt2.cu it includes, for g++ and the emulator; or, given
    main, train_gpt2.cu (with TESTING) and that main."""
    trainer = (out / "train_gpt2.cu").read_text()
    harness = (out / "test_gpt2.cu").read_text()
    assert harness.count('#include "train_gpt2.cu"') == 1
    before, after = harness.split('#include "train_gpt2.cu"')
    if main is not None:
        before, after = "#define TESTING\n", main
    trainer = re.sub(r"^#include <(cuda_runtime|cuda_bf16)\.h>\n", "", trainer, flags=re.M)
    for name, replacement in REPLACEMENTS.items():  # the inline PTX, as the emulator's SourceModule does
        trainer = re.sub(r"^__device__ inline void " + name + r"\(.*?^\}$", replacement, trainer, flags=re.S | re.M)
    assert not re.search(r"\basm\b", re.sub(r"//[^\n]*", "", trainer)), "inline PTX the emulator does not know"
    return '#include "emulator.h"\n' + RUNTIME + before + launches(trainer) + after


SPEC = specs.load("test-odd").with_overrides(max_seq_len=160)


def build(tmp: Path, precision: str, edit=None) -> Path:
    """The emulated harness (and the rows driver) for SPEC in precision, --matmul tiled; edit,
    if given, changes the emitted train_gpt2.cu's text first."""
    out = tmp / precision
    with cuda_build(tf32=False):
        emit(SPEC, out, "cuda", precision, "tiled")
    if edit is not None:
        (out / "train_gpt2.cu").write_text(edit((out / "train_gpt2.cu").read_text()))
    (out / "emulator.h").write_text(EMULATOR_H)
    for name, main in (("test_gpt2_emulated", None), ("rows_emulated", ROWS_MAIN)):
        (out / f"{name}.cpp").write_text(emulated_source(out, main))
        cmd = [CXX, "-O1", "-std=c++17", "-w", "-I", str(out), "-I", str(CUDA_INCLUDE), f"{name}.cpp", "-lm",
               "-o", name]
        result = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
    return out / "test_gpt2_emulated"


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def harness(request, tmp_path_factory):
    """(the emulated harness, a test-odd model file) in fp32 and bf16."""
    if CXX is None or CUDA_INCLUDE is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists():
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h)")
    tmp = tmp_path_factory.mktemp(f"emulated-{request.param}")
    exe = build(tmp, request.param)
    rng = np.random.default_rng(3)
    params = {name: rng.normal(1.0 if name.startswith("ln") and name.endswith("w") else 0.0, 0.3, shape)
              .astype(np.float32) for name, shape in param_shapes(SPEC).items()}
    write_model(tmp / "model.bin", SPEC, params)
    return request.param, exe, tmp / "model.bin"


def run(exe, *args):
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


PROMPT = [96, 5, 17]


@needs_cxx
def test_cached_greedy_tokens_equal_the_whole_window_ones(harness):
    """A window of 8: 18 new tokens after 3 go 13 past it, where the cache is refilled from the
    last 7 tokens every step."""
    precision, exe, model = harness
    cached = [int(x) for x in run(exe, "generate", model, 1, 8, 18, *PROMPT).split()]
    whole = [int(x) for x in run(exe, "generate", model, 0, 8, 18, *PROMPT).split()]
    assert cached[:2] == PROMPT[1:]  # the prompt is written, but a leading token 96 (<|endoftext|>)
    assert cached[2:7] == whole[:5], "within the window"
    if precision == "fp32":
        assert cached[2:] == whole and len(whole) == 18, "past the window"
    assert len(set(whole)) >= 3


@needs_cxx
def test_past_a_block_of_keys(harness):
    """A prompt of 130 tokens and 10 more in a window of 150: from position 128 the attention
    over the cache takes two blocks of keys, combined."""
    precision, exe, model = harness
    prompt = [96] + [int(t) for t in np.random.default_rng(5).integers(0, 97, 129)]
    cached = [int(x) for x in run(exe, "generate", model, 1, 150, 10, *prompt).split()]
    whole = [int(x) for x in run(exe, "generate", model, 0, 150, 10, *prompt).split()]
    assert cached[129:] == whole and len(whole) == 10


@needs_cxx
def test_cached_logits_equal_the_whole_forward(harness):
    """At every position of 24 tokens (the whole context): within verify's forward tolerance
    (2e-5 in fp32, 3e-2 in bf16) of the largest logit."""
    precision, exe, model = harness
    ids = [96] + [int(t) for t in np.random.default_rng(4).integers(0, 97, 23)]
    rows = [line.split() for line in run(exe, "logits", model, *ids).splitlines()]
    assert [int(t) for t, _ in rows] == list(range(24))
    errors = [float(e) for _, e in rows]
    assert all(np.isfinite(errors)) and max(errors) < TOLERANCES[precision]["forward"], rows
    if precision == "fp32":
        assert max(errors) < 1e-5, rows


@needs_cxx
def test_rows_of_their_own(harness):
    """Three rows, each its own tokens, 20 steps in a window of 8: the prefill of each row, the
    steps of all rows at once, and the refill of every row past the window, each row's logits
    against its own whole forward."""
    precision, exe, model = harness
    rows = [line.split() for line in run(exe.parent / "rows_emulated", model, 3, 8, 20).splitlines()]
    assert [int(i) for i, _ in rows] == list(range(1, 21))
    errors = [float(e) for _, e in rows]
    assert all(np.isfinite(errors)) and max(errors) < TOLERANCES[precision]["forward"], rows
    if precision == "fp32":
        assert max(errors) < 1e-5, rows
