"""llmgen verify's comparison of the CUDA trainer, without a GPU: the emitted harness
(test_gpt2.cu around train_gpt2.cu, --matmul tiled) compiled with g++ against the CPU
emulator and stand-in runtime of tests/test_cuda_emulated_generation.py, run as verify runs
the real one, and compared with the reference op by op (verify.check).

What it shows: every CUDA kernel of a training step (forward, backward, AdamW, the gradient
norm and clipping) computes what the reference computes, in fp32 to fp32's tolerances and in
bf16 to bf16's, with the bf16 tensor-core attention's mma and ldmatrix emulated; where bf16
rounding enters (the table is printed); and that a broken kernel is named as the first
divergence. What it cannot: cuBLASLt, the GPU's own rounding inside mma, real concurrency.
"""

import pytest

from llmgen.enums import Target
from llmgen.verify import check, first_divergence, format_table

from test_cuda_emulated import CUDA_INCLUDE, CXX, needs_cxx
from test_cuda_emulated_generation import SPEC, build

B, T, STEPS, ACCUM = 2, 13, 2, 2


def emulated_rows(tmp_path, precision, edit=None):
    """Build the emulated harness (after `edit` of the emitted train_gpt2.cu) and compare."""
    if CXX is None or CUDA_INCLUDE is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists():
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h)")
    exe = build(tmp_path, precision, edit)
    rows = check(SPEC, exe, exe.parent, Target.CUDA, precision, B, T, STEPS, ACCUM, seed=0, threads=1)
    print("\n" + format_table(SPEC, rows, B, T, "cuda", precision))
    return rows


@needs_cxx
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cuda_trainer_matches_the_reference_op_by_op(tmp_path, precision):
    rows = emulated_rows(tmp_path, precision)
    assert first_divergence(rows) is None, first_divergence(rows)
    forward = [r for r in rows if r.phase == "forward"]
    if precision == "bf16":
        # bf16 enters at the first kernel (the encoder's sum, rounded to 8 significant bits:
        # a relative error up to 2^-8) and stays at that order through the layers
        assert 1e-3 < forward[0].error < 2 ** -8
        assert max(r.error for r in forward) < 3e-2
    else:
        assert max(r.error for r in forward) < 2e-6


@needs_cxx
@pytest.mark.parametrize("what, old, new, expected", [
    ("gelu forward: a digit dropped", "float u = GELU_SCALE * (x + 0.044715f * x * x * x);\n    return",
     "float u = GELU_SCALE * (x + 0.04715f * x * x * x);\n    return", "forward, layer 0, gelu (fch_gelu"),
    ("layernorm backward: dbias's term dropped", "            db += dy;\n", "", "backward, final layernorm (dlnfb"),
])
def test_a_broken_kernel_is_named(tmp_path, what, old, new, expected):
    def edit(text):
        assert text.count(old) == 1, what
        return text.replace(old, new)
    rows = emulated_rows(tmp_path, "fp32", edit)
    assert first_divergence(rows).startswith(f"first divergence: {expected}"), first_divergence(rows)
