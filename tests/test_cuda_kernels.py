"""Every CUDA kernel, forward and backward, through PyCUDA against the NumPy reference function
of the same name, on fresh random inputs, in fp32 and bf16.

The kernels come from llmgen's kernels-only render (render_kernels), compiled by PyCUDA with
SourceModule(source, no_extern_c=True), and are launched with the shapes their host functions
use (emit.kernel_values). Outputs are poisoned (every byte 0xFF: NaN in fp32 and bf16)
before each launch, so an element a kernel forgets to write fails the comparison; outputs
that kernels accumulate into (+=) start from random values instead. The reference runs in
float64 on exactly the values the GPU holds (rounded to bf16 first in bf16). Errors are
normwise, max |gpu - ref| / max |ref|: at most 1e-5 in fp32 and 1e-2 in bf16.

These tests need PyCUDA (pip install '.[cuda]'), an NVIDIA driver and GPU, and nvcc; without
them they skip, saying which is missing.
"""

import math
import shutil

import numpy as np
import pytest

from llmgen import reference as ref
from llmgen import spec as specs
from llmgen.emit import kernel_values, render_kernels
from llmgen.verify import round_to_bf16

pytestmark = pytest.mark.gpu

TOL = {"fp32": 1e-5, "bf16": 1e-2}
K = {}  # kernel launch constants, filled per spec


def cuda_or_skip():
    """PyCUDA's driver, compiler and gpuarray modules, or a skip naming what is missing."""
    try:
        import pycuda  # noqa: F401
    except ImportError:
        pytest.skip("pycuda is not installed (pip install '.[cuda]')")
    try:
        import pycuda.driver as drv
    except ImportError as e:  # no libcuda.so.1: no NVIDIA driver
        pytest.skip(f"no NVIDIA driver: {e}")
    try:
        import pycuda.autoinit  # noqa: F401
    except (drv.Error, RuntimeError) as e:
        pytest.skip(f"no CUDA device: {e}")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH (PyCUDA compiles the kernels with it)")
    import pycuda.gpuarray as gpuarray
    from pycuda.compiler import SourceModule
    return drv, SourceModule, gpuarray


class Gpu:
    """Compiled kernels for one spec and precision, with helpers to move floatX data."""

    def __init__(self, spec_name, overrides, precision, drv, SourceModule, gpuarray):
        self.spec = specs.load(spec_name).with_overrides(**overrides)
        self.precision = precision
        self.bf16 = precision == "bf16"
        self.tol = TOL[precision]
        self.drv, self.gpuarray = drv, gpuarray
        self.k = kernel_values(self.spec, precision)
        self.module = SourceModule(render_kernels(self.spec, precision), no_extern_c=True)

    def fn(self, name):
        return self.module.get_function(name)

    def values(self, a):
        """The values a floatX buffer can hold: rounded to bf16 in bf16."""
        a = np.asarray(a, dtype=np.float32)
        return round_to_bf16(a) if self.bf16 else a

    def to_x(self, values):
        """A floatX GPU array holding values (which must be representable: see values())."""
        v = np.ascontiguousarray(values, dtype=np.float32)
        if self.bf16:
            return self.gpuarray.to_gpu((v.view(np.uint32) >> np.uint32(16)).astype(np.uint16))
        return self.gpuarray.to_gpu(v)

    def from_x(self, g):
        a = g.get()
        if self.bf16:
            return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return a

    def poisoned(self, shape, dtype):
        """A GPU array with every byte 0xFF (NaN as fp32 and as bf16, -1 as int)."""
        g = self.gpuarray.empty(shape, dtype)
        self.drv.memset_d8(g.gpudata, 0xFF, g.nbytes)
        return g

    def poisoned_x(self, shape):
        return self.poisoned(shape, np.uint16 if self.bf16 else np.float32)

    def f32(self, a):
        return self.gpuarray.to_gpu(np.ascontiguousarray(a, dtype=np.float32))

    def i32(self, a):
        return self.gpuarray.to_gpu(np.ascontiguousarray(a, dtype=np.int32))

    def check(self, got, want, what, scale=None):
        """Normwise: max |got - want| / max |want|, or / scale where want is all zero (dq and dk
        at T = 1: then only the rounding of their sums is left)."""
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        assert np.all(np.isfinite(got)), f"{what}: non-finite values (an element left unwritten?)"
        scale = float(np.max(np.abs(want))) if scale is None else scale
        err = float(np.max(np.abs(got - want)) / max(scale, 1e-30))
        assert err <= self.tol, f"{what} ({self.precision}): normwise error {err:.3e} > {self.tol:.0e}"


_compiled = {}


def compiled(spec_name, overrides, precision):
    """The Gpu of a spec (a preset with overrides) and precision, compiled once."""
    key = (spec_name, tuple(sorted(overrides.items())), precision)
    if key not in _compiled:
        _compiled[key] = Gpu(spec_name, overrides, precision, *cuda_or_skip())
    return _compiled[key]


@pytest.fixture(params=["fp32", "bf16"])
def gpu(request):
    """test-odd: 2 layers, 3 heads of 16, 48 channels, vocab 97 padded to 128."""
    return compiled("test-odd", {}, request.param)


# Head sizes for the attention kernels, as test-odd overrides with 2 heads and room for
# T = 300: 16 is test-odd's own; 24 is one the bf16 tensor-core kernels cannot take (bf16
# falls back to the simple kernels); 64 is GPT-2's; 128 the largest the tensor-core kernels take.
HEADS = {24: {"channels": 48, "heads": 2, "max_seq_len": 320}, 32: {"channels": 64, "heads": 2, "max_seq_len": 320},
         64: {"channels": 128, "heads": 2, "max_seq_len": 320}, 128: {"channels": 256, "heads": 2, "max_seq_len": 320}}


@pytest.fixture(params=["fp32", "bf16"])
def gpu64(request):
    """Heads of 64 channels, as in every GPT-2, for the attention kernels."""
    return compiled("test-odd", HEADS[64], request.param)


def rng(seed=0):
    return np.random.default_rng(seed)


def blocks(n, size):
    return int(math.ceil(n / size))


B, T = 2, 13


# ---- encoder -----------------------------------------------------------------------------
def test_encoder_forward(gpu):
    s, r = gpu.spec, rng(1)
    C = s.n_embd
    wte = gpu.values(r.normal(0, 1, (s.padded_vocab_size, C)))
    wpe = gpu.values(r.normal(0, 1, (s.max_seq_len, C)))
    tokens = r.integers(0, s.vocab_size, (B, T))
    out = gpu.poisoned_x((B, T, C))
    gpu.fn("encoder_forward_kernel")(out, gpu.i32(tokens), gpu.to_x(wte), gpu.to_x(wpe),
                                     np.int32(B), np.int32(T), np.int32(C),
                                     block=(gpu.k["BLOCK_SIZE"], 1, 1), grid=(blocks(B * T * C, gpu.k["BLOCK_SIZE"]), 1))
    gpu.check(gpu.from_x(out), ref.encoder_forward(wte.astype(np.float64), wpe.astype(np.float64), tokens), "encoder out")


def test_encoder_backward(gpu):
    s, r = gpu.spec, rng(2)
    C, Vp, maxT = s.n_embd, s.padded_vocab_size, s.max_seq_len
    tokens = r.integers(0, 7, (B, T))  # a small range: tokens repeat
    dout = gpu.values(r.normal(0, 1, (B, T, C)))
    dwte0 = r.normal(0, 1, (Vp, C)).astype(np.float32)
    dwpe0 = r.normal(0, 1, (maxT, C)).astype(np.float32)
    want_dwte, want_dwpe = dwte0.astype(np.float64), dwpe0.astype(np.float64)
    ref.encoder_backward(want_dwte, want_dwpe, dout.astype(np.float64), tokens)
    dwte, dwpe, dout_g = gpu.f32(dwte0), gpu.f32(dwpe0), gpu.to_x(dout)
    bs = gpu.k["BLOCK_SIZE"]
    gpu.fn("encoder_backward_wpe_kernel")(dwpe, dout_g, np.int32(B), np.int32(T), np.int32(C),
                                          block=(bs, 1, 1), grid=(blocks(T * C, bs), 1))
    # the token buckets, as the host's counting sort makes them: distinct tokens in increasing
    # order, each with its positions in increasing order
    flat = tokens.reshape(-1)
    distinct = np.unique(flat)
    positions = np.argsort(flat, kind="stable")
    starts = np.concatenate([[0], np.cumsum([np.sum(flat == v) for v in distinct])])
    gpu.fn("encoder_backward_wte_kernel")(dwte, dout_g, gpu.i32(distinct), gpu.i32(starts), gpu.i32(positions),
                                          np.int32(C), block=(bs, 1, 1), grid=(len(distinct), blocks(C, bs)))
    gpu.check(dwpe.get(), want_dwpe, "dwpe")
    gpu.check(dwte.get(), want_dwte, "dwte")


# ---- layernorm and the column sums --------------------------------------------------------
def layernorm_inputs(gpu, N, seed):
    r = rng(seed)
    C = gpu.spec.n_embd
    inp = gpu.values(r.normal(0.5, 2, (N, C)))
    weight = gpu.values(r.normal(1, 0.3, C))
    bias = gpu.values(r.normal(0, 0.3, C))
    return inp, weight, bias


def test_layernorm_forward(gpu):
    N, C = B * T, gpu.spec.n_embd
    inp, weight, bias = layernorm_inputs(gpu, N, 3)
    out, mean, rstd = gpu.poisoned_x((N, C)), gpu.poisoned((N,), np.float32), gpu.poisoned((N,), np.float32)
    rows = gpu.k["LN_ROWS_PER_BLOCK"]
    gpu.fn("layernorm_forward_kernel")(out, mean, rstd, gpu.to_x(inp), gpu.to_x(weight), gpu.to_x(bias),
                                       np.int32(N), np.int32(C), block=(32 * rows, 1, 1), grid=(blocks(N, rows), 1))
    want, want_mean, want_rstd = ref.layernorm_forward(*(a.astype(np.float64) for a in (inp, weight, bias)))
    gpu.check(gpu.from_x(out), want, "layernorm out")
    gpu.check(mean.get(), want_mean, "layernorm mean")
    gpu.check(rstd.get(), want_rstd, "layernorm rstd")


def test_layernorm_backward(gpu):
    N, C = 600, gpu.spec.n_embd  # more rows than one chunk of the column sums (REDUCE_ROWS)
    r = rng(4)
    inp, weight, bias = layernorm_inputs(gpu, N, 4)
    _, mean, rstd = ref.layernorm_forward(*(a.astype(np.float64) for a in (inp, weight, bias)))
    mean, rstd = mean.astype(np.float32), rstd.astype(np.float32)
    dout = gpu.values(r.normal(0, 1, (N, C)))
    dinp0 = gpu.values(r.normal(0, 1, (N, C)))
    dweight0 = r.normal(0, 1, C).astype(np.float32)
    dbias0 = r.normal(0, 1, C).astype(np.float32)
    dx, dw, db = ref.layernorm_backward(dout.astype(np.float64), inp.astype(np.float64), weight.astype(np.float64),
                                        mean.astype(np.float64), rstd.astype(np.float64))
    dinp, dout_g, inp_g = gpu.to_x(dinp0), gpu.to_x(dout), gpu.to_x(inp)
    mean_g, rstd_g = gpu.f32(mean), gpu.f32(rstd)
    rows = gpu.k["LN_ROWS_PER_BLOCK"]
    gpu.fn("layernorm_backward_kernel")(dinp, dout_g, inp_g, gpu.to_x(weight), mean_g, rstd_g, np.int32(N), np.int32(C),
                                        block=(32 * rows, 1, 1), grid=(blocks(N, rows), 1))
    gpu.check(gpu.from_x(dinp), dinp0.astype(np.float64) + dx, "layernorm dinp (+=)")
    chunks = blocks(N, gpu.k["REDUCE_ROWS"])
    partial_w, partial_b = gpu.poisoned((chunks, C), np.float32), gpu.poisoned((chunks, C), np.float32)
    gpu.fn("layernorm_param_grads_partial_kernel")(partial_w, partial_b, dout_g, inp_g, mean_g, rstd_g,
                                                   np.int32(N), np.int32(C), block=(32, 8, 1), grid=(blocks(C, 32), chunks))
    dweight, dbias = gpu.f32(dweight0), gpu.f32(dbias0)
    finish = gpu.fn("column_sum_finish_kernel")
    bs = gpu.k["BLOCK_SIZE"]
    finish(dweight, partial_w, np.int32(chunks), np.int32(C), np.float32(1), block=(bs, 1, 1), grid=(blocks(C, bs), 1))
    finish(dbias, partial_b, np.int32(chunks), np.int32(C), np.float32(1), block=(bs, 1, 1), grid=(blocks(C, bs), 1))
    gpu.check(dweight.get(), dweight0 + dw, "layernorm dweight (+=)")
    gpu.check(dbias.get(), dbias0 + db, "layernorm dbias (+=)")


def test_bias_backward(gpu):
    N, OC, scale = 600, 97, 0.5
    r = rng(5)
    dout = gpu.values(r.normal(0, 1, (N, OC)))
    dbias0 = r.normal(0, 1, OC).astype(np.float32)
    chunks = blocks(N, gpu.k["REDUCE_ROWS"])
    partial = gpu.poisoned((chunks, OC), np.float32)
    gpu.fn("bias_backward_partial_kernel")(partial, gpu.to_x(dout), np.int32(N), np.int32(OC),
                                           block=(32, 8, 1), grid=(blocks(OC, 32), chunks))
    dbias = gpu.f32(dbias0)
    bs = gpu.k["BLOCK_SIZE"]
    gpu.fn("column_sum_finish_kernel")(dbias, partial, np.int32(chunks), np.int32(OC), np.float32(scale),
                                       block=(bs, 1, 1), grid=(blocks(OC, bs), 1))
    _, _, db = ref.matmul_backward(dout.astype(np.float64), np.zeros((N, 1)), np.zeros((OC, 1)))
    gpu.check(dbias.get(), dbias0 + scale * db, "dbias (+=)")


# ---- matmul (the tiled kernel; cuBLASLt is checked end to end by verify) ----------------
def test_matmul_forward_and_backward(gpu):
    N, IC, OC, alpha = B * T, 48, 97, 0.75
    r = rng(6)
    inp = gpu.values(r.normal(0, 1, (N, IC)))
    weight = gpu.values(r.normal(0, 0.2, (OC, IC)))
    bias = gpu.values(r.normal(0, 1, OC))
    dout = gpu.values(r.normal(0, 1, (N, OC)))
    dweight0 = r.normal(0, 1, (OC, IC)).astype(np.float32)
    tile = gpu.k["TILE"]
    mm = gpu.fn("matmul_tiled_kernel")
    null = np.uintp(0)
    inp_g, weight_g = gpu.to_x(inp), gpu.to_x(weight)

    def launch(out_x, out_f, a, a_row, a_col, b, b_row, b_col, bias_g, M, Ncols, Kdim, alpha, accumulate):
        mm(out_x, out_f, a, np.uint64(a_row), np.uint64(a_col), b, np.uint64(b_row), np.uint64(b_col), bias_g,
           np.int32(M), np.int32(Ncols), np.int32(Kdim), np.float32(alpha), np.int32(accumulate),
           block=(tile, tile, 1), grid=(blocks(Ncols, tile), blocks(M, tile)))

    # forward: out (N,OC) = inp @ weight^T + bias, the operands read as the host function reads them
    out = gpu.poisoned_x((N, OC))
    launch(out, null, inp_g, IC, 1, weight_g, 1, IC, gpu.to_x(bias), N, OC, IC, 1.0, 0)
    gpu.check(gpu.from_x(out), ref.matmul_forward(inp.astype(np.float64), weight.astype(np.float64),
                                                  bias.astype(np.float64)), "matmul out")
    # backward: dinp = alpha dout @ weight (overwritten), dweight += alpha dout^T @ inp (fp32)
    dx, dw, _ = ref.matmul_backward(dout.astype(np.float64), inp.astype(np.float64), weight.astype(np.float64))
    dout_g = gpu.to_x(dout)
    dinp = gpu.poisoned_x((N, IC))
    launch(dinp, null, dout_g, OC, 1, weight_g, IC, 1, null, N, IC, OC, alpha, 0)
    gpu.check(gpu.from_x(dinp), alpha * dx, "matmul dinp")
    dweight = gpu.f32(dweight0)
    launch(null, dweight, dout_g, 1, OC, inp_g, IC, 1, null, OC, IC, N, alpha, 1)
    gpu.check(dweight.get(), dweight0 + alpha * dw, "matmul dweight (+=)")


# ---- attention ---------------------------------------------------------------------------
def attention_case(g, T_, seed):
    s, r = g.spec, rng(seed)
    qkv = g.values(r.normal(0, 1, (B, T_, 3 * s.n_embd)))
    dout = g.values(r.normal(0, 1, (B, T_, s.n_embd)))
    return qkv, dout


def lse_reference(qkv, NH):
    """log(sum over t2 <= t of exp(q[t].k[t2] / sqrt(HS))) per (b, h, t)."""
    Bn, T_, C3 = qkv.shape
    C = C3 // 3
    HS = C // NH
    q = qkv[..., :C].reshape(Bn, T_, NH, HS).transpose(0, 2, 1, 3)
    k = qkv[..., C:2 * C].reshape(Bn, T_, NH, HS).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HS)
    s = np.where(np.tril(np.ones((T_, T_), bool)), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]


def attention_kernels(g, T_):
    """The attention kernels of g's source and their launch shapes, as attention_forward and
    attention_backward launch them: (forward, dq, dk dv), grid, threads per block."""
    k, NH = g.k, g.spec.n_head
    if "FLASH_ROWS" in k:  # the tensor-core kernels (bf16, head sizes 16, 32, ..., 128)
        names = ("flash_forward_kernel", "flash_backward_dq_kernel", "flash_backward_dkdv_kernel")
        return names, (blocks(T_, k["FLASH_ROWS"]), B * NH), 32 * k["FLASH_WARPS"]
    names = ("attention_forward_kernel", "attention_backward_dq_kernel", "attention_backward_dkdv_kernel")
    return names, (blocks(T_, k["ATT_BQ"]), B * NH), k["ATT_BQ"] * k["HEAD_LANES"]


def run_attention(g, T_, seed):
    s = g.spec
    NH, C = s.n_head, s.n_embd
    qkv, dout = attention_case(g, T_, seed)
    q64, d64 = qkv.astype(np.float64), dout.astype(np.float64)
    want_out, _, att = ref.attention_forward(q64, NH)
    want_lse = lse_reference(q64, NH)
    (forward, dq_kernel, dkdv_kernel), grid, threads = attention_kernels(g, T_)
    qkv_g = g.to_x(qkv)
    out, lse = g.poisoned_x((B, T_, C)), g.poisoned((B, NH, T_), np.float32)
    sizes = (np.int32(B), np.int32(T_), np.int32(NH))
    g.fn(forward)(out, lse, qkv_g, *sizes, block=(threads, 1, 1), grid=grid)
    g.check(g.from_x(out), want_out, f"attention out (T={T_})")
    g.check(lse.get(), want_lse, f"attention lse (T={T_})")

    # backward, from the reference's out and lse as the GPU holds them
    out_v = g.values(want_out)
    delta = g.poisoned((B, NH, T_), np.float32)
    bs = g.k["BLOCK_SIZE"]
    dout_g = g.to_x(dout)
    g.fn("attention_backward_delta_kernel")(delta, dout_g, g.to_x(out_v), *sizes, block=(bs, 1, 1),
                                            grid=(blocks(B * NH * T_, bs), 1))
    HS = C // NH
    want_delta = (d64 * out_v.astype(np.float64)).reshape(B, T_, NH, HS).sum(-1).transpose(0, 2, 1)
    g.check(delta.get(), want_delta, f"attention delta (T={T_})")
    dqkv = g.poisoned_x((B, T_, 3 * C))
    lse_g = g.f32(want_lse)
    g.fn(dq_kernel)(dqkv, dout_g, qkv_g, lse_g, delta, *sizes, block=(threads, 1, 1), grid=grid)
    g.fn(dkdv_kernel)(dqkv, dout_g, qkv_g, lse_g, delta, *sizes, block=(threads, 1, 1), grid=grid)
    want = ref.attention_backward(d64, q64, att, NH)
    got = g.from_x(dqkv)
    for part, name in enumerate(("dq", "dk", "dv")):
        want_part = want[..., part * C:(part + 1) * C]
        # at T = 1 dq and dk are exactly zero: then judge them at the scale of dv
        scale = float(np.max(np.abs(want_part))) or float(np.max(np.abs(want)))
        g.check(got[..., part * C:(part + 1) * C], want_part, f"attention {name} (T={T_})", scale=scale)


def test_attention_small_heads(gpu):
    """test-odd's heads of 16 (in bf16 the tensor-core kernels at their smallest head size)."""
    run_attention(gpu, T, 7)


@pytest.mark.parametrize("T_", [1, 100])
def test_attention_heads_of_64(gpu64, T_):
    """T = 100: two blocks of queries, and key tiles that end past T."""
    run_attention(gpu64, T_, 8)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("head_size", sorted(HEADS))
@pytest.mark.parametrize("T_", [17, 300])
def test_attention_head_sizes(precision, head_size, T_):
    """Head sizes 24, 32, 64 and 128 at T = 17 and 300: T not a multiple of any tile, and long
    enough for several blocks of queries and of keys (64 rows each in the tensor-core kernels)
    and for every warp of a block to skip some tiles and mask others."""
    g = compiled("test-odd", HEADS[head_size], precision)
    assert ("FLASH_ROWS" in g.k) == (precision == "bf16" and head_size % 16 == 0)
    run_attention(g, T_, 20 + head_size)


# ---- generation: matrix-vector products, the cache of keys and values, attention over it --
# A head size of 20 as well: in bf16 it is not a multiple of 8, so the generation kernels load
# one element at a time (DECODE_VEC 1) instead of 16 bytes.
DECODE_HEADS = {**HEADS, 20: {"channels": 40, "heads": 2, "max_seq_len": 320}}


def run_matvec(g, R, IC, OC, bias, gelu, residual, seed):
    """out = inp @ weight^T (+ bias), then gelu or + residual (in place: out is the residual)."""
    r = rng(seed)
    inp = g.values(r.normal(0, 1, (R, IC)))
    weight = g.values(r.normal(0, 0.2, (OC, IC)))
    b = g.values(r.normal(0, 1, OC)) if bias else None
    want = ref.matmul_forward(inp.astype(np.float64), weight.astype(np.float64),
                              None if b is None else b.astype(np.float64))
    if gelu:
        want = ref.gelu_forward(want)
    null = np.uintp(0)
    if residual:
        res = g.values(r.normal(0, 1, (R, OC)))
        want = want + res
        out = g.to_x(res)
        res_g = out
    else:
        out, res_g = g.poisoned_x((R, OC)), null
    warps = g.k["MATVEC_WARPS"]
    g.fn("matvec_forward_kernel")(out, g.to_x(inp), g.to_x(weight), null if b is None else g.to_x(b), res_g,
                                  np.int32(R), np.int32(IC), np.int32(OC), np.int32(gelu),
                                  block=(32 * warps, 1, 1), grid=(blocks(OC, warps), 1))
    g.check(g.from_x(out), want, f"matvec out (R={R}, IC={IC}, OC={OC}, bias {bias}, gelu {gelu}, residual {residual})")


def test_matvec_forward(gpu):
    """test-odd: IC = C = 48, fewer channels than a warp's lanes load at once (32 x DECODE_VEC);
    OC = 97, not a multiple of MATVEC_WARPS; the classifier's shape (no bias, Vp outputs)."""
    C = gpu.spec.n_embd
    run_matvec(gpu, 1, C, 97, True, False, False, 30)
    run_matvec(gpu, 3, C, 4 * C, True, True, False, 31)  # the MLP's first layer, GELU fused
    run_matvec(gpu, 2, C, gpu.spec.padded_vocab_size, False, False, False, 32)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("head_size", [20, 64])
def test_matvec_forward_long_rows(precision, head_size):
    """IC = 4C (a projection from the MLP's hidden layer), several loads per lane, into the
    residual stream in place; R = 10 rows, more than MATVEC_ROWS: two passes over the weights."""
    g = compiled("test-odd", DECODE_HEADS[head_size], precision)
    C = g.spec.n_embd
    assert R_LONG > g.k["MATVEC_ROWS"] and 4 * C > 32 * g.k["DECODE_VEC"]
    assert g.k["DECODE_VEC"] == (1 if (precision, head_size) == ("bf16", 20) else 16 // (2 if g.bf16 else 4))
    run_matvec(g, R_LONG, 4 * C, C, True, False, True, 33)


R_LONG = 10


def test_kvcache_fill(gpu):
    """Row r = 1 of 3 takes positions 0..n-1 of every layer from the qkv activations of a
    forward over n = 13 tokens; the other rows, and positions n and past, are untouched."""
    s, r = gpu.spec, rng(34)
    L, NH, C, R, n, W, row = s.n_layer, s.n_head, s.n_embd, 3, 13, 17, 1
    HS = C // NH
    qkv = gpu.values(r.normal(0, 1, (L, n, 3 * C)))
    keys0 = gpu.values(r.normal(0, 1, (L, R, NH, W, HS)))
    values0 = gpu.values(r.normal(0, 1, (L, R, NH, W, HS)))
    keys, values = gpu.to_x(keys0), gpu.to_x(values0)
    bs = gpu.k["BLOCK_SIZE"]
    gpu.fn("kvcache_fill_kernel")(keys, values, gpu.to_x(qkv), np.int32(row), np.int32(L), np.int32(R), np.int32(NH),
                                  np.int32(n), np.int32(W), block=(bs, 1, 1), grid=(blocks(L * n * C, bs), 1))
    want_k, want_v = keys0.copy(), values0.copy()
    want_k[:, row, :, :n] = qkv[..., C:2 * C].reshape(L, n, NH, HS).transpose(0, 2, 1, 3)
    want_v[:, row, :, :n] = qkv[..., 2 * C:].reshape(L, n, NH, HS).transpose(0, 2, 1, 3)
    assert np.array_equal(gpu.from_x(keys), want_k) and np.array_equal(gpu.from_x(values), want_v)


def run_attention_decode(g, T_, seed):
    """The attention of position t = T_ - 1 over a cache holding 0..t-1 (of W = T_ + 3 slots,
    those past t NaN: read, they would show) against the last row of the whole sequence's."""
    s = g.spec
    NH, C = s.n_head, s.n_embd
    HS = C // NH
    qkv, _ = attention_case(g, T_, seed)  # (B,T,3C)
    want = ref.attention_forward(qkv.astype(np.float64), NH)[0][:, -1]  # (B,C)
    t, W = T_ - 1, T_ + 3

    def heads(x):  # (B,T,C) -> (B,NH,T,HS)
        return x.reshape(B, T_, NH, HS).transpose(0, 2, 1, 3)
    keys0 = np.full((B, NH, W, HS), np.nan, np.float32)
    values0 = np.full((B, NH, W, HS), np.nan, np.float32)
    keys0[:, :, :t] = heads(qkv[..., C:2 * C])[:, :, :t]
    values0[:, :, :t] = heads(qkv[..., 2 * C:])[:, :, :t]
    keys, values = g.to_x(keys0), g.to_x(values0)
    chunks = blocks(T_, g.k["DECODE_CHUNK"])
    out, partial = g.poisoned_x((B, C)), g.poisoned((B, NH, chunks, HS + 2), np.float32)
    threads = g.k["DECODE_THREADS"]
    g.fn("attention_decode_kernel")(out, partial, keys, values, g.to_x(qkv[:, t]), np.int32(B), np.int32(NH),
                                    np.int32(W), np.int32(t), block=(threads, 1, 1), grid=(chunks, B * NH))
    if chunks > 1:
        g.fn("attention_decode_combine_kernel")(out, partial, np.int32(B), np.int32(NH), np.int32(chunks),
                                                block=(threads, 1, 1), grid=(B * NH, 1))
    g.check(g.from_x(out), want, f"attention over the cache (T={T_}, HS={HS}, {chunks} chunk{'s' if chunks > 1 else ''})")
    # position t joined the cache; the others are as they were
    want_k, want_v = keys0.copy(), values0.copy()
    want_k[:, :, t] = heads(qkv[..., C:2 * C])[:, :, t]
    want_v[:, :, t] = heads(qkv[..., 2 * C:])[:, :, t]
    np.testing.assert_array_equal(g.from_x(keys), want_k)
    np.testing.assert_array_equal(g.from_x(values), want_v)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("head_size", [20, 64, 128])
@pytest.mark.parametrize("T_", [1, 17, 129, 300])
def test_attention_decode(precision, head_size, T_):
    """One new position over the cache: T = 1 (its own key only), 17 (one chunk of keys), 129
    (a second chunk of one key) and 300 (three chunks, combined): windows that are not
    multiples of any tile; heads of 20 (one element a load in bf16), 64 and 128."""
    g = compiled("test-odd", DECODE_HEADS[head_size], precision)
    assert (T_ > g.k["DECODE_CHUNK"]) == (T_ >= 129)
    run_attention_decode(g, T_, 40 + T_ + head_size)


# ---- GELU, residual ----------------------------------------------------------------------
def test_gelu_forward_and_backward(gpu):
    N = 1000
    r = rng(9)
    x = gpu.values(r.normal(0, 2, N))
    dout = gpu.values(r.normal(0, 1, N))
    bs = gpu.k["BLOCK_SIZE"]
    launch = dict(block=(bs, 1, 1), grid=(blocks(N, bs), 1))
    out = gpu.poisoned_x((N,))
    x_g = gpu.to_x(x)
    gpu.fn("gelu_forward_kernel")(out, x_g, np.uint64(N), **launch)
    gpu.check(gpu.from_x(out), ref.gelu_forward(x.astype(np.float64)), "gelu out")
    want = ref.gelu_backward(dout.astype(np.float64), x.astype(np.float64))
    dinp = gpu.poisoned_x((N,))
    gpu.fn("gelu_backward_kernel")(dinp, x_g, gpu.to_x(dout), np.uint64(N), **launch)
    gpu.check(gpu.from_x(dinp), want, "gelu dinp")
    in_place = gpu.to_x(dout)  # dinp = dout, as the matmul's backward uses it
    gpu.fn("gelu_backward_kernel")(in_place, x_g, in_place, np.uint64(N), **launch)
    gpu.check(gpu.from_x(in_place), want, "gelu dinp in place")


def test_residual_forward(gpu):
    N = 1000
    r = rng(10)
    a, b = gpu.values(r.normal(0, 1, N)), gpu.values(r.normal(0, 1, N))
    out = gpu.poisoned_x((N,))
    bs = gpu.k["BLOCK_SIZE"]
    gpu.fn("residual_forward_kernel")(out, gpu.to_x(a), gpu.to_x(b), np.uint64(N), block=(bs, 1, 1), grid=(blocks(N, bs), 1))
    want = ref.residual_forward(a.astype(np.float64), b.astype(np.float64))
    gpu.check(gpu.from_x(out), want, "residual out")
    # its backward is the identity for both inputs (ref.residual_backward): the CUDA trainer
    # has no kernel for it, its residual-stream gradient buffer simply flows on


# ---- the fused classifier ----------------------------------------------------------------
def run_classifier(g, N, seed):
    s, r = g.spec, rng(seed)
    V, Vp, dloss = s.vocab_size, s.padded_vocab_size, 1.0 / N
    logits = g.values(r.normal(0, 3, (N, Vp)))  # the padded entries hold values too: ignored
    targets = r.integers(0, V, N)
    logits_g, losses = g.to_x(logits), g.poisoned((N,), np.float32)
    g.fn("classifier_kernel")(logits_g, losses, g.i32(targets), np.float32(dloss), np.int32(N), np.int32(V),
                              np.int32(Vp), block=(g.k["CLASSIFIER_BLOCK"], 1, 1), grid=(N, 1))
    probs = ref.softmax_forward(logits.astype(np.float64)[None], V)
    g.check(losses.get(), ref.crossentropy_forward(probs, targets[None])[0], f"classifier losses (V={V})")
    want = ref.crossentropy_softmax_backward(probs, targets[None], dloss)[0]
    g.check(g.from_x(logits_g), want, f"classifier dlogits in place (V={V})")


def test_classifier(gpu):
    """Vocab 97 padded to 128: fewer logits than threads."""
    run_classifier(gpu, B * T, 11)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_classifier_large_vocab(precision):
    """Vocab 3001 padded to 3072: each of CLASSIFIER_BLOCK threads takes several logits (its own
    online softmax, then the block's), and the padding past V gets a zero gradient."""
    g = compiled("test-odd", {"vocab_size": 3001}, precision)
    assert g.spec.vocab_size >= 1024 and g.spec.vocab_size > 2 * g.k["CLASSIFIER_BLOCK"]
    run_classifier(g, 5, 12)


# ---- AdamW and the gradient norm ---------------------------------------------------------
def test_adamw(gpu):
    n, r = 5000, rng(12)
    t, lr, beta1, beta2, eps, wd, grad_scale = 3, 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5
    master0 = r.normal(0, 1, n).astype(np.float32)
    params0 = gpu.values(master0)  # in bf16 the parameters are the rounded master weights
    grads = r.normal(0, 1, n).astype(np.float32)
    m0 = (r.normal(0, 0.1, n)).astype(np.float32)
    v0 = np.abs(r.normal(0, 0.1, n)).astype(np.float32)
    want = {"wte": (master0 if gpu.bf16 else params0).astype(np.float64)}  # "wte" has weight decay
    want_m, want_v = {"wte": m0.astype(np.float64)}, {"wte": v0.astype(np.float64)}
    ref.adamw(gpu.spec, want, {"wte": grads.astype(np.float64)}, want_m, want_v, t, lr, beta1, beta2, eps, wd, grad_scale)
    params, m, v = gpu.to_x(params0), gpu.f32(m0), gpu.f32(v0)
    master = gpu.f32(master0) if gpu.bf16 else None
    bs = gpu.k["BLOCK_SIZE"]
    m_corr, v_corr = np.float32(1 - np.float32(beta1) ** t), np.float32(1 - np.float32(beta2) ** t)
    gpu.fn("adamw_kernel")(params, master if master is not None else np.uintp(0), gpu.f32(grads), m, v, np.uint64(n),
                           np.float32(lr), np.float32(beta1), np.float32(beta2), np.float32(eps), np.float32(wd),
                           np.float32(grad_scale), m_corr, v_corr, block=(bs, 1, 1), grid=(blocks(n, bs), 1))
    gpu.check(m.get(), want_m["wte"], "adamw m")
    gpu.check(v.get(), want_v["wte"], "adamw v")
    gpu.check(gpu.from_x(params), want["wte"], "adamw params")
    if gpu.bf16:
        gpu.check(master.get(), want["wte"], "adamw master weights")
        assert np.array_equal(gpu.from_x(params), round_to_bf16(master.get()))


def test_grad_norm(gpu):
    n = 300_001
    grads = rng(13).normal(0, 1, n).astype(np.float32)
    k = gpu.k
    partial = gpu.poisoned((k["NORM_BLOCKS"],), np.float64)
    gpu.fn("grad_norm_partial_kernel")(partial, gpu.f32(grads), np.uint64(n), block=(k["BLOCK_SIZE"], 1, 1),
                                       grid=(k["NORM_BLOCKS"], 1))
    gpu.check([math.sqrt(float(np.sum(partial.get())))], [ref.grad_norm({"g": grads.astype(np.float64)})], "grad norm")


def test_float_to_bf16(gpu):
    if not gpu.bf16:
        pytest.skip("fp32 has no conversion kernel")
    values = rng(14).normal(0, 1, 1000).astype(np.float32)
    out = gpu.poisoned_x((1000,))
    bs = gpu.k["BLOCK_SIZE"]
    gpu.fn("float_to_floatX_kernel")(out, gpu.f32(values), np.uint64(1000), block=(bs, 1, 1), grid=(blocks(1000, bs), 1))
    assert np.array_equal(gpu.from_x(out), round_to_bf16(values))  # round to nearest even, exactly


# ---- the skips themselves (these run everywhere) -----------------------------------------
@pytest.mark.parametrize("driver_source, autoinit_source, reason", [
    ("raise ImportError('libcuda.so.1: cannot open shared object file')", "", "no NVIDIA driver: libcuda.so.1"),
    ("class Error(Exception):\n    pass\n", "from pycuda.driver import Error\nraise Error('cuInit failed: no CUDA-capable device is detected')",
     "no CUDA device: cuInit failed"),
])
def test_skips_with_the_reason(tmp_path, monkeypatch, driver_source, autoinit_source, reason):
    """A PyCUDA whose driver cannot load libcuda, or that finds no device, gives a skip that says so."""
    package = tmp_path / "pycuda"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "driver.py").write_text(driver_source)
    (package / "autoinit.py").write_text(autoinit_source)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in list(__import__("sys").modules) if m == "pycuda" or m.startswith("pycuda.")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    with pytest.raises(pytest.skip.Exception, match=reason):
        cuda_or_skip()
