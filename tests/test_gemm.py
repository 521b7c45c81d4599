"""The emitted gemm on its own: every operand layout the trainer uses, edges, and K and N
blocks, against a plain double-precision loop; and the same bits on any number of threads."""

import subprocess

import pytest

from llmgen import spec as specs
from llmgen.emit import emit

# test-tiny's gemm packs blocks of at most 4C = 128 rows of B and 2^20 floats, so K = 300
# takes 3 blocks of K and N = 9000 (with K = 128) takes 2 blocks of N.
HARNESS = r"""
#define TESTING
#include "train_gpt2.c"

static double check(int layout, int M, int N, int K, int accumulate, int with_bias, uint64_t* rng, uint64_t* bits) {
    float* a = malloc_check((size_t)M * K * sizeof(float));
    float* b = malloc_check((size_t)K * N * sizeof(float));
    float* c = malloc_check((size_t)M * N * sizeof(float));
    float* bias = malloc_check((size_t)M * sizeof(float));
    double* ref = malloc_check((size_t)M * N * sizeof(double));
    for (size_t i = 0; i < (size_t)M * K; i++) { a[i] = random_f32(rng) - 0.5f; }
    for (size_t i = 0; i < (size_t)K * N; i++) { b[i] = random_f32(rng) - 0.5f; }
    for (size_t i = 0; i < (size_t)M * N; i++) { c[i] = random_f32(rng) - 0.5f; }
    for (int m = 0; m < M; m++) { bias[m] = random_f32(rng) - 0.5f; }
    // the strides of A (M,K), B (K,N) and C (M,N) in the trainer's three products
    long a_m, a_k, b_k, b_n, c_m, c_n;
    if (layout == 0) { a_m = K; a_k = 1; b_k = 1; b_n = K; c_m = 1; c_n = M; }  // forward: C^T, B^T
    else if (layout == 1) { a_m = K; a_k = 1; b_k = N; b_n = 1; c_m = N; c_n = 1; }  // dinp
    else { a_m = 1; a_k = M; b_k = N; b_n = 1; c_m = N; c_n = 1; }  // dweight: A^T
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double s = accumulate ? c[m * c_m + n * c_n] : (with_bias ? bias[m] : 0.0);
            for (int k = 0; k < K; k++) { s += (double)a[m * a_m + k * a_k] * b[k * b_k + n * b_n]; }
            ref[(size_t)m * N + n] = s;
        }
    }
    gemm(c, c_m, c_n, a, a_m, a_k, b, b_k, b_n, with_bias ? bias : NULL, M, N, K, accumulate);
    double err = 0.0, scale = 1e-30;
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            float x = c[m * c_m + n * c_n];
            uint32_t u;
            memcpy(&u, &x, 4);
            *bits = *bits * 31 + u;
            double d = fabs(x - ref[(size_t)m * N + n]);
            if (d > err) { err = d; }
            if (fabs(ref[(size_t)m * N + n]) > scale) { scale = fabs(ref[(size_t)m * N + n]); }
        }
    }
    free(a); free(b); free(c); free(bias); free(ref);
    return err / scale;
}

int main(void) {
    int shapes[][3] = {{8, 32, 16}, {1, 1, 1}, {7, 33, 5}, {17, 70, 129}, {64, 96, 300}, {9, 9000, 128}, {3, 9000, 300}};
    uint64_t rng = 7, bits = 0;
    double worst = 0.0;
    for (int s = 0; s < (int)(sizeof(shapes) / sizeof(shapes[0])); s++) {
        for (int layout = 0; layout < 3; layout++) {
            for (int accumulate = 0; accumulate < 2; accumulate++) {
                double e = check(layout, shapes[s][0], shapes[s][1], shapes[s][2], accumulate, !accumulate, &rng, &bits);
                if (e > worst) { worst = e; }
            }
        }
    }
    printf("%.3e %llu\n", worst, (unsigned long long)bits);
    return 0;
}
"""


@pytest.mark.parametrize("isa", [[], ["-mno-avx512f"], ["-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-avx"]],
                         ids=["native", "avx2", "sse"])
def test_gemm_layouts_edges_blocks_and_threads(tmp_path, isa):
    """Without AVX-512 the gemm takes its AVX2 tile sizes, without AVX2 its SSE ones (checked here for
    correctness only)."""
    emit(specs.load("test-tiny"), tmp_path)
    (tmp_path / "gemm_check.c").write_text(HARNESS)
    build = subprocess.run(["gcc", "-Ofast", "-march=native", *isa, "-fopenmp", "-Wall", "-Wno-unused-function",
                            "gemm_check.c", "-lm", "-o", "gemm_check"], cwd=tmp_path, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    outputs = {}
    for threads in (1, 3):
        run = subprocess.run(["./gemm_check"], cwd=tmp_path, capture_output=True, text=True,
                             env={"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"})
        assert run.returncode == 0, run.stderr
        err, bits = run.stdout.split()
        assert float(err) < 1e-5, run.stdout
        outputs[threads] = bits
    assert outputs[1] == outputs[3]  # every element summed in the same order
