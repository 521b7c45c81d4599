"""The CUDA trainer's host code, compiled and run without a GPU: the device memory it
allocates is what `llmgen info --target cuda` says, and its cuBLASLt matmuls (the plan cache,
TF32, and which answers of cuBLASLt's heuristic fall back and which stop the program) behave
as documented, against a stand-in cuBLASLt that records what it is asked.

A probe program includes train_gpt2.cu with TESTING defined (no main of its own) and calls
its host functions: device_buffers (the table gpt2_alloc allocates from) and cublaslt_matmul.
It is built for PTX only (no GPU code generation, a few seconds) and linked with the stand-in
instead of libcublasLt; it never touches a GPU.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmgen import spec as specs
from llmgen.emit import cuda_build, device_memory, emit

from conftest import llmgen

NVCC = shutil.which("nvcc") or (os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc")
needs_nvcc = pytest.mark.skipif(not os.access(NVCC, os.X_OK) or shutil.which("gcc") is None,
                                reason="nvcc or gcc not found")
MIB = 1024 * 1024

PROBE = r"""
#define TESTING
#include "train_gpt2.cu"

extern "C" void fake_cublaslt_report(void);

// memory B T: the bytes of every device buffer gpt2_alloc allocates, and their sum
// kvcache rows window: the same for the cache of keys and values kvcache_alloc allocates
// matmuls M,N,K ...: one cublaslt_matmul of each shape (a forward with bias), with fake,
// 256-byte aligned device pointers (nothing reads them)
int main(int argc, char** argv) {
    if (argc >= 4 && (strcmp(argv[1], "memory") == 0 || strcmp(argv[1], "kvcache") == 0)) {
        GPT2 model;
        KVCache cache;
        memset(&model, 0, sizeof(model));
        memset(&cache, 0, sizeof(cache));
        DeviceBuffer buffers[NUM_DEVICE_BUFFERS + NUM_KVCACHE_BUFFERS];
        int n = argv[1][0] == 'm' ? NUM_DEVICE_BUFFERS : NUM_KVCACHE_BUFFERS;
        if (n == NUM_DEVICE_BUFFERS) {
            device_buffers(buffers, &model, atoi(argv[2]), atoi(argv[3]));
        } else {
            kvcache_buffers(buffers, &cache, atoi(argv[2]), atoi(argv[3]));
        }
        size_t total = 0;
        for (int i = 0; i < n; i++) {
            printf("buffer %zu %s\n", buffers[i].bytes, buffers[i].what);
            total += buffers[i].bytes;
        }
        printf("total %zu\n", total);
        return 0;
    }
    cublaslt_init();
    const floatX* x = (const floatX*)(uintptr_t)(1 << 20);
    for (int i = 2; i < argc; i++) {
        int m, n, k;
        if (sscanf(argv[i], "%d,%d,%d", &m, &n, &k) != 3) { die("bad shape %s", argv[i]); }
        int ok = cublaslt_matmul((void*)x, CUDA_FLOATX, NULL, x, 1, k, x, 0, k, m, n, k, 1.0f, 0.0f,
                                 CUBLASLT_EPILOGUE_BIAS, x, NULL, "the tiled kernel");
        printf("matmul %s %s\n", argv[i], ok ? "cublaslt" : "fallback");
    }
    cublaslt_free();
    fake_cublaslt_report();
    return 0;
}
"""

# A stand-in for libcublasLt: descriptors are malloc'd blocks, the heuristic answers as
# FAKE_HEURISTIC says (ok, none: success with no algorithm, not_supported, invalid), and
# fake_cublaslt_report prints what was asked of it.
FAKE_CUBLASLT = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cublasLt.h>

static int heuristics, matmuls, descs, descs_freed, layouts, layouts_freed, prefs, prefs_freed, compute = -1;

cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) { *h = (cublasLtHandle_t)malloc(64); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) { free(h); return CUBLAS_STATUS_SUCCESS; }
const char* cublasLtGetStatusName(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        default: return "CUBLAS_STATUS_OTHER";
    }
}
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t c, cudaDataType_t s) {
    (void)s;
    compute = (int)c;
    descs++;
    *d = (cublasLtMatmulDesc_t)calloc(1, sizeof(**d));
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { descs_freed++; free(d); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, const void* b,
                                              size_t n) {
    (void)d; (void)a; (void)b; (void)n;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType t, uint64_t r, uint64_t c, int64_t ld) {
    (void)t; (void)r; (void)c; (void)ld;
    layouts++;
    *l = (cublasLtMatrixLayout_t)calloc(1, sizeof(**l));
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { layouts_freed++; free(l); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
    prefs++;
    *p = (cublasLtMatmulPreference_t)calloc(1, sizeof(**p));
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { prefs_freed++; free(p); return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t a,
                                                    const void* b, size_t n) {
    (void)p; (void)a; (void)b; (void)n;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t dd, cublasLtMatmulPreference_t p, int requested,
                                              cublasLtMatmulHeuristicResult_t results[], int* found) {
    (void)h; (void)d; (void)a; (void)b; (void)c; (void)dd; (void)p; (void)requested;
    heuristics++;
    const char* answer = getenv("FAKE_HEURISTIC");
    *found = 0;
    if (answer && strcmp(answer, "not_supported") == 0) { return CUBLAS_STATUS_NOT_SUPPORTED; }
    if (answer && strcmp(answer, "invalid") == 0) { return CUBLAS_STATUS_INVALID_VALUE; }
    if (answer && strcmp(answer, "none") == 0) { return CUBLAS_STATUS_SUCCESS; }
    memset(&results[0], 0, sizeof(results[0]));
    *found = 1;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t ad, const void* B, cublasLtMatrixLayout_t bd, const void* beta,
                              const void* C, cublasLtMatrixLayout_t cd, void* D, cublasLtMatrixLayout_t dd,
                              const cublasLtMatmulAlgo_t* algo, void* w, size_t ws, cudaStream_t s) {
    (void)h; (void)d; (void)alpha; (void)A; (void)ad; (void)B; (void)bd; (void)beta; (void)C; (void)cd; (void)D;
    (void)dd; (void)algo; (void)w; (void)ws; (void)s;
    matmuls++;
    return CUBLAS_STATUS_SUCCESS;
}
void fake_cublaslt_report(void) {
    printf("heuristics %d matmuls %d descs %d/%d layouts %d/%d preferences %d/%d compute %d\n", heuristics, matmuls,
           descs, descs_freed, layouts, layouts_freed, prefs, prefs_freed, compute);
}
"""

# The variants probed: name -> (precision, CudaBuild choices)
VARIANTS = {"bf16": ("bf16", {}), "fp32": ("fp32", {}), "fp32-exact-recompute": ("fp32", {"tf32": False,
                                                                                         "recompute_gelu": True})}


def build_probe(folder, precision, choices):
    with cuda_build(**choices):
        emit(specs.load("gpt2-124m"), folder, "cuda", precision)
    (folder / "probe.cu").write_text(PROBE)
    (folder / "fake_cublaslt.c").write_text(FAKE_CUBLASLT)
    include = os.path.dirname(os.path.realpath(NVCC)) + "/../include"
    subprocess.run(["gcc", "-O1", "-c", "-I", include, "fake_cublaslt.c", "-o", "fake_cublaslt.o"], cwd=folder,
                   check=True, capture_output=True)
    result = subprocess.run([NVCC, "-O1", "-arch=compute_90", "-code=compute_90", "-Xcompiler", "-Wno-unused-function",
                             "probe.cu", "fake_cublaslt.o", "-o", "probe"], cwd=folder, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return folder / "probe"


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    if not os.access(NVCC, os.X_OK) or shutil.which("gcc") is None:
        pytest.skip("nvcc or gcc not found")
    root = tmp_path_factory.mktemp("probes")
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(build_probe, root / name, precision, choices)
                   for name, (precision, choices) in VARIANTS.items()}
        return {name: f.result() for name, f in futures.items()}


def run(probe, *args, heuristic="ok"):
    return subprocess.run([str(probe), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, FAKE_HEURISTIC=heuristic))


def info_bytes(*args) -> int:
    result = llmgen("info", "--spec", "gpt2-124m", "--target", "cuda", *args)
    assert result.returncode == 0, result.stderr
    return int(re.search(r"total +[\d,.]+ MiB \(([\d,]+) bytes\)", result.stdout).group(1).replace(",", ""))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("B, T", [(16, 1024), (64, 1024), (3, 17)])
def test_the_trainer_allocates_what_info_says(probes, variant, B, T):
    precision, choices = VARIANTS[variant]
    result = run(probes[variant], "memory", B, T)
    assert result.returncode == 0, result.stderr
    total = int(re.search(r"^total (\d+)$", result.stdout, re.M).group(1))
    flags = ["--precision", precision] + (["--no-tf32"] if choices.get("tf32") is False else []) + \
        (["--recompute-gelu"] if choices.get("recompute_gelu") else [])
    assert total == info_bytes("-b", B, "-t", T, *flags)
    with cuda_build(**choices):
        assert total == sum(b for _, b in device_memory(specs.load("gpt2-124m"), B, T, precision))


@pytest.mark.parametrize("variant", ["bf16", "fp32"])
@pytest.mark.parametrize("rows, window", [(1, 1024), (3, 17), (2, 129)])
def test_the_cache_of_keys_and_values_allocates_what_it_says(probes, variant, rows, window):
    """kvcache_alloc's table against emit.kvcache_memory: the keys and values (L, rows, NH,
    window, HS) in floatX, the attention's partial sums for ceil(window / DECODE_CHUNK)
    chunks, and one position's activations."""
    from llmgen.emit import kvcache_memory
    precision = VARIANTS[variant][0]
    result = run(probes[variant], "kvcache", rows, window)
    assert result.returncode == 0, result.stderr
    total = int(re.search(r"^total (\d+)$", result.stdout, re.M).group(1))
    spec = specs.load("gpt2-124m")
    assert total == kvcache_memory(spec, rows, window, precision)
    x = 2 if precision == "bf16" else 4
    kv = 2 * 12 * rows * 12 * window * 64 * x
    assert ("buffer %d the cache of keys\n" % (kv // 2)) in result.stdout
    chunks = -(-window // 128)
    rest = rows * (768 * (1 + 1 + 3 + 1 + 4) * x + 2 * 4 + 12 * chunks * 66 * 4 + 50304 * x + 4)
    assert total == kv + rest
    if (rows, window) == (1, 1024) and precision == "bf16":
        assert kv == 37_748_736  # 36 MiB a sample at gpt2-124m's whole context


def test_info_lists_every_kind_of_device_memory():
    result = llmgen("info", "--spec", "gpt2-124m", "--target", "cuda", "--precision", "bf16", "-b", 64, "-t", 1024)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "device memory of the CUDA trainer (bf16, cuBLASLt bf16 matmuls) at B=64, T=1024:" in out
    for group in ("parameters", "gradients", "master weights", "AdamW m and v", "activations", "backward buffers",
                  "token ids", "cuBLASLt workspace"):
        assert re.search(rf"^  {group} +[\d,.]+ MiB$", out, re.M), group
    rows = {m.group(1).strip(): float(m.group(2).replace(",", ""))
            for m in re.finditer(r"^  (.+?) +([\d,.]+) MiB", out, re.M)}
    assert abs(sum(v for k, v in rows.items() if k != "total") - rows["total"]) < 0.5
    assert rows["parameters"] == pytest.approx(124_475_904 * 2 / MIB, abs=0.1)  # bf16
    assert rows["master weights"] == pytest.approx(124_475_904 * 4 / MIB, abs=0.1)
    fp32 = llmgen("info", "--spec", "gpt2-124m", "--target", "cuda", "-b", 64, "-t", 1024).stdout
    assert "master weights" not in fp32 and "cuBLASLt TF32 matmuls" in fp32
    assert info_bytes("--precision", "bf16", "-b", 64, "-t", 1024, "--recompute-gelu") == \
        info_bytes("--precision", "bf16", "-b", 64, "-t", 1024) - 11 * 64 * 1024 * 4 * 768 * 2  # 11 of 12 layers' fch_gelu


def test_no_device_memory_outside_the_table():
    """gpt2_alloc allocates every device buffer from device_buffers, kvcache_alloc (only while
    sampling) from kvcache_buffers, and nothing else calls cudaMalloc: so the first table's sum
    is all the trainer allocates outside sampling (and prints as it starts)."""
    from llmgen.emit import render
    for precision in ("fp32", "bf16"):
        for matmul in ("cublaslt", "tiled"):
            src = render(specs.load("gpt2-124m"), "cuda", precision, matmul)["train_gpt2.cu"]
            assert src.count("cudaMalloc(") == 1 and "cudaMalloc(&p, bytes)" in src  # in gpu_malloc
            calls = [line.strip() for line in src.splitlines() if "gpu_malloc(" in line and "static void* gpu_malloc" not in line]
            assert calls == [f"for (int i = 0; i < {n}; i++) {{ *buffers[i].ptr = gpu_malloc(buffers[i].bytes, "
                             "buffers[i].what); }" for n in ("NUM_DEVICE_BUFFERS", "NUM_KVCACHE_BUFFERS")], calls
            assert src.index("gpu_malloc(buffers[i].bytes") > src.index("static void gpt2_alloc(")
            assert src.rindex("gpu_malloc(buffers[i].bytes") > src.index("static void kvcache_alloc(")
            # the cache gives back what it took
            assert "cudaCheck(cudaFree(*buffers[i].ptr));\n        gpu_bytes_allocated -= buffers[i].bytes;" in src
            table = src.split("DeviceBuffer list[NUM_DEVICE_BUFFERS] = {\n")[1].split("};")[0]
            entries = re.findall(r"^\s*\{\(void\*\*\)&(\S+), (.+), \"(.+)\"\},", table, re.M)
            assert len(entries) == int(re.search(r"#define NUM_DEVICE_BUFFERS (\d+)", src).group(1))
            assert ("cublaslt_workspace" in [e[0] for e in entries]) == (matmul == "cublaslt")
            assert "gpu_bytes_allocated += bytes;" in src and "gpu_bytes_allocated / 1048576.0" in src
            # the backward never reads the projections' outputs: they are not kept
            assert not re.search(r"\b(attproj|fcproj)\b", src.split("} ActivationTensors;")[0].split("typedef struct {")[-1])


def test_matmul_plans_are_made_once_per_shape(probes):
    result = run(probes["bf16"], "matmuls", "8,16,32", "8,16,32", "64,16,32", "8,16,32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("cublaslt") == 4 and result.stderr == ""
    # two shapes: two descriptors, 3 layouts each, one heuristic query each; everything freed
    assert "heuristics 2 matmuls 4 descs 2/2 layouts 6/6 preferences 2/2" in result.stdout


def test_the_plan_table_makes_room_for_new_shapes(probes):
    shapes = [f"{8 * (i + 1)},16,32" for i in range(70)] + ["8,16,32"]  # MATMUL_PLANS is 64
    result = run(probes["bf16"], "matmuls", *shapes)
    assert result.returncode == 0, result.stderr
    assert "heuristics 71 matmuls 71 descs 71/71 layouts 213/213 preferences 71/71" in result.stdout


@pytest.mark.parametrize("heuristic", ["not_supported", "none"])
def test_no_algorithm_falls_back_with_a_note_per_shape(probes, heuristic):
    result = run(probes["bf16"], "matmuls", "8,16,32", "8,16,32", "64,16,32", heuristic=heuristic)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" fallback") == 3 and "matmuls 0 " in result.stdout
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith("note: cuBLASLt has no algorithm for the matmul m=") for n in notes)
    assert "m=8 n=16 k=32 (A^T lda 32, B ldb 32), epilogue bias, bf16 output" in notes[0]
    assert notes[0].endswith("it runs as the tiled kernel instead")


def test_any_other_heuristic_error_stops_the_program(probes):
    """Not a silent fallback to the tiled kernel (about 100x slower): an error naming the shape."""
    result = run(probes["bf16"], "matmuls", "8,16,32", heuristic="invalid")
    assert result.returncode == 1 and "cublaslt" not in result.stdout
    assert result.stderr.startswith("error: cuBLASLt error CUBLAS_STATUS_INVALID_VALUE for the matmul m=8 n=16 k=32 "
                                    "(A^T lda 32, B ldb 32), epilogue bias, bf16 output"), result.stderr


@pytest.mark.parametrize("variant, compute", [("bf16", "CUBLAS_COMPUTE_32F"), ("fp32", "CUBLAS_COMPUTE_32F_FAST_TF32"),
                                              ("fp32-exact-recompute", "CUBLAS_COMPUTE_32F")])
def test_tf32_only_for_fp32_and_when_chosen(probes, variant, compute):
    from llmgen import emit as e
    header = open(os.path.dirname(os.path.realpath(NVCC)) + "/../include/cublas_api.h").read()
    value = int(re.search(rf"\b{compute}\s*=\s*(\d+)", header).group(1))
    result = run(probes[variant], "matmuls", "8,16,32")
    assert result.returncode == 0 and f"compute {value}\n" in result.stdout, result.stdout
    assert e  # (the emitted file says which, see test_cuda_emit.py)
