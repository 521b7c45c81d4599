"""Render the C and CUDA trainers from the templates.

Python computes every size, name and offset here; the templates only print them.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import jinja2

from . import __version__
from .errors import LlmgenError
from .fileio import write_atomic
from .spec import Spec
from .tensors import ACTS, CUDA_ACTS, CUDA_FP32_ACTS, PARAMS, num_params

# Symbolic dimension -> C expression, for sizes that depend on B and T at run time.
C_DIMS = {"B": "B", "T": "T", "L": "NUM_LAYERS", "NH": "NUM_HEADS", "C": "CHANNELS",
          "3C": "3 * CHANNELS", "4C": "4 * CHANNELS", "Vp": "PADDED_VOCAB_SIZE", "maxT": "MAX_SEQ_LEN"}

# The layer templates under templates/layers/, in the order they appear in the file.
LAYERS = ("encoder", "layernorm", "matmul", "attention", "gelu", "residual", "classifier")

TARGETS = ("c", "cuda", "all")
PRECISIONS = ("fp32", "bf16")
MATMULS = ("cublaslt", "tiled")
# The CUDA kernel templates under templates/cuda/layers/, in file order.
CUDA_LAYERS = ("common", "reduce", "encoder", "layernorm", "gelu", "matmul", "attention", "residual",
               "classifier", "adamw", "norm")


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("llmgen", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def origin(spec: Spec) -> str:
    """Where the spec came from, for the generated-file header: no absolute paths."""
    source = spec.source
    if source.startswith("preset "):
        return source
    if source.startswith("checkpoint "):
        return f"checkpoint {Path(source.removeprefix('checkpoint ')).name}"
    head, sep, rest = source.partition(" with ")
    return f"spec file {Path(head).name}{sep}{rest}"


def _c_float(x: float) -> str:
    s = f"{x:.9g}"
    return (s if "." in s or "e" in s else s + ".0") + "f"


def _pad(names: list[str]) -> list[int]:
    width = max(len(n) for n in names)
    return [width - len(n) for n in names]


def _act_size_expr(shape: tuple[str, ...]) -> str:
    """A C expression for the number of floats, e.g. (size_t)NUM_LAYERS * B * T * CHANNELS."""
    return "(size_t)" + " * ".join(C_DIMS[d] for d in shape)


def matmul_sizes(spec: Spec) -> dict:
    """Tile and block sizes of the emitted gemm (see layers/matmul.c.j2).

    Register tiles (rows x columns of C): with AVX-512, 8 x 32 fills 16 of the 32 vector
    registers (16 floats each) with sums, leaving room for the broadcasts of A and the
    loads of B; with AVX2's 16 registers of 8 floats, 4 x 24 takes 12 of them. KC keeps the
    whole K of every forward matmul (up to the MLP's 4C) in one block, so that the forward's
    transposed tiles are stored once; only the classifier's dinp (K = Vp) and dweight with
    many rows take several blocks. A packed block of B is at most 4 MiB, to stay in the L2
    and L3 caches.
    """
    avx512, avx2 = (8, 32), (4, 24)
    kc = 4 * spec.n_embd
    pack = max(1 << 20, kc * avx512[1])
    return {"avx512": avx512, "avx2": avx2, "kc": kc, "pack": pack,
            "kc_doc": "4C, the longest K of a forward", "pack_doc": f"{pack * 4 / 2**20:g} MiB"}


def context(spec: Spec) -> dict:
    dims = spec.dims
    L = spec.n_layer
    params = []
    for t, pad, spad in zip(PARAMS, _pad([t.name for t in PARAMS]),
                            _pad([str(t.numel(dims)) for t in PARAMS])):
        std = {"normal": 0.02, "residual": 0.02 / math.sqrt(2 * L), "ones": -1.0, "zeros": 0.0}[t.init]
        params.append({"name": t.name, "shape": t.shape_comment(), "doc": t.doc, "pad": pad,
                       "size": t.numel(dims), "size_pad": spad, "decay": int(t.decay),
                       "init_std": _c_float(std), "ref": f"&p->{t.name}"})
    for p, pad in zip(params, _pad([p["init_std"] for p in params])):
        p["init_pad"] = pad
    acts = []
    exprs = [_act_size_expr(a.shape) for a in ACTS]
    for a, pad, expr, epad in zip(ACTS, _pad([a.name for a in ACTS]), exprs, _pad(exprs)):
        acts.append({"name": a.name, "shape": a.shape_comment(), "doc": a.doc, "pad": pad,
                     "size_expr": expr, "size_pad": epad, "ref": f"&a->{a.name}", "grad": int(a.grad)})
    constants = [
        ("NUM_LAYERS", spec.n_layer, "L: transformer blocks"),
        ("NUM_HEADS", spec.n_head, "NH: attention heads"),
        ("CHANNELS", spec.n_embd, "C: embedding channels"),
        ("HEAD_SIZE", spec.head_size, "HS = C / NH"),
        ("VOCAB_SIZE", spec.vocab_size, "V: real vocabulary"),
        ("PADDED_VOCAB_SIZE", spec.padded_vocab_size, "Vp: vocabulary padded for speed; rows past V are unused"),
        ("MAX_SEQ_LEN", spec.max_seq_len, "maxT: longest sequence"),
    ]
    cpad = _pad([f"{n} {v}" for n, v, _ in constants])
    return {
        "version": __version__,
        "origin": origin(spec),
        "spec": spec,
        "n_params": num_params(dims),
        "params": params,
        "acts": acts,
        "constants": [{"name": n, "value": v, "doc": d, "pad": p} for (n, v, d), p in zip(constants, cpad)],
        "layers": LAYERS,
        "gemm": matmul_sizes(spec),
        "eot_token": spec.vocab_size - 1,
        "cuda": False,
        "program": "train_gpt2",
    }


def kernel_constants(spec: Spec) -> dict[str, int]:
    """Launch shapes of the CUDA kernels, printed as #defines; the PyCUDA tests launch with them too."""
    HS = spec.head_size
    return {
        "BLOCK_SIZE": 256,          # threads per block of the element-wise kernels
        "LN_ROWS_PER_BLOCK": 8,     # layernorm: one warp per row
        "REDUCE_ROWS": 256,         # column sums: rows per block (chunk) in the first stage
        "CLASSIFIER_BLOCK": 512,    # fused classifier: threads per row
        "NORM_BLOCKS": 512,         # gradient norm: blocks in the first stage (a fixed number: deterministic)
        "TILE": 16,                 # tiled matmul: TILE x TILE outputs per block
        "ATT_BQ": 64,               # attention: queries (or keys) per block, one per thread
        # attention: key (or query) rows per shared-memory tile; two tiles of ATT_BK x HS floats
        # stay within 32 KiB of static shared memory
        "ATT_BK": max(1, min(32, 4096 // HS)),
    }


def cuda_context(spec: Spec, precision: str = "fp32", matmul: str = "cublaslt") -> dict:
    """The C context plus what the CUDA trainer needs: precision, matmul path, its activations."""
    if precision not in PRECISIONS:
        raise LlmgenError(f"precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if matmul not in MATMULS:
        raise LlmgenError(f"matmul '{matmul}': expected one of {', '.join(MATMULS)}")
    ctx = context(spec)
    bf16 = precision == "bf16"
    acts = []
    exprs = [_act_size_expr(a.shape) for a in CUDA_ACTS]
    types = ["float" if a.name in CUDA_FP32_ACTS else "floatX" for a in CUDA_ACTS]
    decls = [f"{ty}* {a.name};" for ty, a in zip(types, CUDA_ACTS)]
    for a, ty, decl, dpad, expr, epad in zip(CUDA_ACTS, types, decls, _pad(decls), exprs, _pad(exprs)):
        acts.append({"name": a.name, "shape": a.shape_comment(), "doc": a.doc, "type": ty, "decl": decl,
                     "pad": dpad, "size_expr": expr, "size_pad": epad, "ref": f"(void**)&a->{a.name}"})
    constants = kernel_constants(spec)
    cpad = _pad([f"{n} {v}" for n, v in constants.items()])
    C = spec.n_embd
    ctx.update({
        "cuda": True,
        "program": "train_gpt2cu",
        "precision": precision,
        "bf16": bf16,
        "model_version": 5 if bf16 else 3,
        "cublaslt": matmul == "cublaslt",
        "matmul": matmul,
        "cuda_acts": acts,
        "kernel_constants": [{"name": n, "value": v, "pad": p} for (n, v), p in zip(constants.items(), cpad)],
        # cuBLASLt's GELU epilogues need the leading dimension of the pre-GELU matrix (4C)
        # to be a multiple of 8
        "gelu_fusion": int(matmul == "cublaslt" and (4 * C) % 8 == 0),
        "layers": CUDA_LAYERS,
        "host": True,
    })
    return ctx


def render(spec: Spec, target: str = "c", precision: str = "fp32", matmul: str = "cublaslt") -> dict[str, str]:
    """The emitted files, by name: the C trainer and its harness, the CUDA ones, or all, with
    a Makefile for what was emitted."""
    if target not in TARGETS:
        raise LlmgenError(f"target '{target}': expected one of {', '.join(TARGETS)}")
    env = _env()
    files = {}
    if target in ("c", "all"):
        ctx = context(spec)
        files.update((name, env.get_template(name + ".j2").render(ctx))
                     for name in ("train_gpt2.c", "test_gpt2.c", "bench_gpt2.c"))
    cctx = cuda_context(spec, precision, matmul)
    if target in ("cuda", "all"):
        files.update((name, env.get_template("cuda/" + name + ".j2").render(cctx))
                     for name in ("train_gpt2.cu", "test_gpt2.cu"))
    files["Makefile"] = env.get_template("Makefile.j2").render(
        cctx, c_target=target in ("c", "all"), cuda_target=target in ("cuda", "all"), cuda=False)
    return files


def render_kernels(spec: Spec, precision: str = "fp32", matmul: str = "cublaslt") -> str:
    """The CUDA kernels alone (no host code), for PyCUDA: SourceModule(src, no_extern_c=True)."""
    ctx = cuda_context(spec, precision, matmul)
    ctx["host"] = False
    return _env().get_template("cuda/kernels.cu.j2").render(ctx)


def emit(spec: Spec, out_dir: str | Path, target: str = "c", precision: str = "fp32",
         matmul: str = "cublaslt") -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    for name, text in render(spec, target, precision, matmul).items():
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            write_atomic(path, [text.encode()])
        written.append(path)
    return written


def make(out_dir: str | Path, target: str = "train_gpt2", cc: str = "gcc", variables: dict | None = None) -> Path:
    """Run the emitted Makefile; a failed build is reported with the compiler's output."""
    out_dir = Path(out_dir)
    args = [f"{k}={v}" for k, v in (variables or {}).items()]
    result = subprocess.run(["make", "-s", target, f"CC={cc}", *args], cwd=out_dir, capture_output=True, text=True)
    if result.returncode != 0:
        raise LlmgenError(f"{out_dir}: make {target} failed:\n{result.stdout}{result.stderr}")
    return out_dir / target
