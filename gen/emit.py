"""Render the C and CUDA trainers from the templates.

Python computes every size, name, offset and expression here; the templates only print
them, and cformat lays the output out (aligned comments, wrapped tables), so that no
template aligns anything by hand.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import jinja2

from . import __version__
from .cformat import format_c, format_make
from .enums import Init, Matmul, Precision, Target
from .errors import LlmgenError
from .fileio import write_atomic
from .spec import Spec
from .tensors import Act, Param, activations, num_params, parameters, shape_comment

# Symbolic dimension -> C expression, for sizes that depend on B and T at run time.
C_DIMS = {"B": "B", "T": "T", "L": "NUM_LAYERS", "NH": "NUM_HEADS", "C": "CHANNELS", "HS": "HEAD_SIZE",
          "3C": "3 * CHANNELS", "4C": "4 * CHANNELS", "Vp": "PADDED_VOCAB_SIZE", "V": "VOCAB_SIZE",
          "maxT": "MAX_SEQ_LEN", "CR": "classifier_rows(B, T)"}

# The layer templates under templates/layers/, in the order they appear in the file.
LAYERS = ("encoder", "layernorm", "matmul", "attention", "gelu", "residual", "classifier")
# The libFuzzer targets that `make fuzz` builds from test_gpt2.c, one per reader (see fuzz.c.j2).
FUZZERS = ("fuzz_model", "fuzz_state", "fuzz_shard", "fuzz_tokenizer")
# The CUDA kernel templates under templates/cuda/layers/, in file order.
CUDA_LAYERS = ("common", "reduce", "encoder", "layernorm", "gelu", "matmul", "attention", "residual",
               "classifier", "adamw", "norm")


def _refs(tensors: list[dict], form: str) -> str:
    """A pointer table's entries: form with {} replaced by each tensor's name, comma-separated."""
    return ", ".join(form.format(t["name"]) for t in tensors)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("llmgen", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["refs"] = _refs
    return env


# A spec's source ends in the overrides applied to it (" with layers=3,heads=2"), if any.
_OVERRIDES = re.compile(r"( with [a-z_]+=-?[0-9]+(,[a-z_]+=-?[0-9]+)*)*$")
# File names printed as they are in an emitted header; any other is quoted and escaped.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._+=,@%-]+")


def _file_name(name: str) -> str:
    """A file name for an emitted file's first comment, which is C and Makefile code: a plain
    name as it is, any other (a newline would end the comment, a backslash continue it) as
    Python's ascii() writes it, quoted, with every character past printable ASCII escaped."""
    return name if _PLAIN_NAME.fullmatch(name) else ascii(name)


def origin(spec: Spec) -> str:
    """Where the spec came from, for the generated-file header: no absolute paths, only the
    file's name, escaped (_file_name); a preset name and overrides are plain already."""
    source = spec.source
    head = source[:_OVERRIDES.search(source).start()]
    overrides = source[len(head):]
    if head.startswith("preset "):
        return f"preset {_file_name(head.removeprefix('preset '))}{overrides}"
    if head.startswith("checkpoint "):
        return f"checkpoint {_file_name(Path(head.removeprefix('checkpoint ')).name)}{overrides}"
    return f"spec file {_file_name(Path(head).name)}{overrides}"


def c_float(x: float) -> str:
    s = f"{x:.9g}"
    return (s if "." in s or "e" in s else s + ".0") + "f"


def c_size(shape: tuple[str, ...]) -> str:
    """A C expression for the number of elements, e.g. (size_t)NUM_LAYERS * B * T * CHANNELS."""
    factors = [C_DIMS[d] for d in shape]
    return factors[0] if len(factors) == 1 else "(size_t)" + " * ".join(factors)


def layer_offset(shape: tuple[str, ...]) -> str:
    """Where layer l's slice of a per-layer tensor (L, ...) starts, as a C expression."""
    return "(size_t)l * " + " * ".join(C_DIMS[d] for d in shape[1:])


def _param(p: Param, spec: Spec) -> dict:
    std = p.init_std(spec.n_layer)
    return {"name": p.name, "shape": shape_comment(p.shape), "doc": p.doc, "size": c_size(p.shape),
            "decay": int(p.decay), "init": {Init.ONES: "INIT_ONES", Init.ZEROS: "INIT_ZEROS"}.get(p.init, "INIT_NORMAL"),
            "std": c_float(std if std is not None else 0.0), "init_formula": p.init_formula(),
            "per_layer": p.per_layer, "layer_shape": shape_comment(p.shape[1:]) if p.per_layer else "",
            "offset": layer_offset(p.shape) if p.per_layer else ""}


def _act(a: Act, floatx: str = "float") -> dict:
    return {"name": a.name, "shape": shape_comment(a.shape), "doc": a.doc, "size": c_size(a.shape),
            "grad": int(a.grad), "type": "float" if a.fp32 else floatx, "per_layer": a.per_layer,
            "layer_shape": shape_comment(a.shape[1:]) if a.per_layer else "",
            "offset": layer_offset(a.shape) if a.per_layer else ""}


def gemm_sizes(spec: Spec) -> dict:
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


def _common_context(spec: Spec, program: str) -> dict:
    params = parameters(spec)
    constants = [
        ("NUM_LAYERS", spec.n_layer, "L: transformer blocks"),
        ("NUM_HEADS", spec.n_head, "NH: attention heads"),
        ("CHANNELS", spec.n_embd, "C: embedding channels"),
        ("HEAD_SIZE", spec.head_size, "HS = C / NH"),
        ("VOCAB_SIZE", spec.vocab_size, "V: real vocabulary"),
        ("PADDED_VOCAB_SIZE", spec.padded_vocab_size, "Vp: vocabulary padded for speed; rows past V are unused"),
        ("MAX_SEQ_LEN", spec.max_seq_len, "maxT: longest sequence"),
    ]
    return {
        "version": __version__,
        "origin": origin(spec),
        "spec": spec,
        "program": program,
        "n_params": num_params(spec),
        "params": [_param(p, spec) for p in params],
        "layer_params": [_param(p, spec) for p in params if p.per_layer],
        "constants": [{"name": n, "value": v, "doc": d} for n, v, d in constants],
        "eot_token": spec.vocab_size - 1,
    }


def c_context(spec: Spec) -> dict:
    """What the C trainer's templates print."""
    ctx = _common_context(spec, "train_gpt2")
    acts = [_act(a) for a in activations(spec, Target.C)]
    ctx.update({
        "target": "c",
        "bf16": False,
        "acts": acts,
        "layer_acts": [a for a in acts if a["per_layer"]],
        "layers": LAYERS,
        "gemm": gemm_sizes(spec),
        "model_version": 3,
        "default_T": min(64, spec.max_seq_len),
        "classifier_rows": spec.classifier_rows,
    })
    return ctx


def kernel_constants(spec: Spec) -> list[tuple[str, int, str]]:
    """Launch shapes of the CUDA kernels, with the reason for each, printed as #defines;
    the PyCUDA tests launch with them too (kernel_values)."""
    HS = spec.head_size
    return [
        ("BLOCK_SIZE", 256, "threads per block of the element-wise kernels"),
        ("LN_ROWS_PER_BLOCK", 8, "layernorm: one warp per row, 8 rows (256 threads) per block"),
        ("REDUCE_ROWS", 256, "column sums: rows per block (chunk) in the first stage"),
        ("CLASSIFIER_BLOCK", 512, "fused classifier: threads per row, each handling Vp / 512 logits"),
        ("NORM_BLOCKS", 512, "gradient norm: blocks in the first stage, a fixed number so the sum is deterministic"),
        ("TILE", 16, "tiled matmul: TILE x TILE outputs per block, one per thread"),
        ("ATT_BQ", 64, "attention: queries (or keys) per block, one per thread"),
        ("ATT_BK", max(1, min(32, 4096 // HS)),
         "attention: key (or query) rows per shared-memory tile (two tiles of ATT_BK x HS floats: <= 32 KiB)"),
    ]


def kernel_values(spec: Spec) -> dict[str, int]:
    return {name: value for name, value, _ in kernel_constants(spec)}


def cuda_context(spec: Spec, precision: Precision | str = Precision.FP32, matmul: Matmul | str = Matmul.CUBLASLT) -> dict:
    """What the CUDA trainer's templates print: precision, matmul path, its activations."""
    precision = Precision.parse(precision, "precision")
    matmul = Matmul.parse(matmul, "matmul")
    ctx = _common_context(spec, "train_gpt2cu")
    bf16 = precision is Precision.BF16
    acts = [_act(a, "floatX") for a in activations(spec, Target.CUDA)]
    C = spec.n_embd
    ctx.update({
        "target": "cuda",
        "precision": precision.value,
        "bf16": bf16,
        "model_version": 5 if bf16 else 3,
        "cublaslt": matmul is Matmul.CUBLASLT,
        "matmul": matmul.value,
        "cuda_acts": acts,
        "layer_acts": [a for a in acts if a["per_layer"]],
        "kernel_constants": [{"name": n, "value": v, "doc": d} for n, v, d in kernel_constants(spec)],
        # cuBLASLt's GELU epilogues need the leading dimension of the pre-GELU matrix (4C)
        # to be a multiple of 8
        "gelu_fusion": int(matmul is Matmul.CUBLASLT and (4 * C) % 8 == 0),
        "layers": CUDA_LAYERS,
        "host": True,
        "default_T": spec.max_seq_len,
    })
    return ctx


def _render(env: jinja2.Environment, name: str, ctx: dict) -> str:
    text = env.get_template(name + ".j2").render(ctx)
    return format_make(text) if name.endswith(("Makefile", ".mk")) else format_c(text)


def render(spec: Spec, target: Target | str = Target.C, precision: Precision | str = Precision.FP32,
           matmul: Matmul | str = Matmul.CUBLASLT) -> dict[str, str]:
    """The emitted files, by name: the C trainer and its harness and bench, the CUDA trainer
    and its harness, or all, with a Makefile for what was emitted."""
    target = Target.parse(target, "target")
    env = _env()
    files = {}
    make_parts = []
    if target.c:
        ctx = c_context(spec)
        files.update((name, _render(env, name, ctx)) for name in ("train_gpt2.c", "test_gpt2.c", "bench_gpt2.c"))
        make_parts.append(("make/c.mk", ctx))
    if target.cuda:
        cctx = cuda_context(spec, precision, matmul)
        files.update((name, _render(env, "cuda/" + name, cctx)) for name in ("train_gpt2.cu", "test_gpt2.cu"))
        make_parts.append(("make/cuda.mk", cctx))
    programs = {"make/c.mk": ["train_gpt2", "test_gpt2", "bench_gpt2", *FUZZERS], "make/cuda.mk": ["train_gpt2cu", "test_gpt2cu"]}
    parts = [env.get_template(name + ".j2").render(ctx) for name, ctx in make_parts]
    files["Makefile"] = format_make(env.get_template("Makefile.j2").render(
        version=__version__, origin=origin(spec), parts=parts,
        default=[programs[name][0] for name, _ in make_parts],
        programs=[p for name, _ in make_parts for p in programs[name]],
        phony=["all", "clean"] + (["fuzz"] if target.c else []) + (["nvcc-check", "cuda-info"] if target.cuda else [])))
    return files


def render_kernels(spec: Spec, precision: Precision | str = Precision.FP32, matmul: Matmul | str = Matmul.CUBLASLT) -> str:
    """The CUDA kernels alone (no host code), for PyCUDA: SourceModule(src, no_extern_c=True)."""
    ctx = cuda_context(spec, precision, matmul)
    ctx["host"] = False
    return format_c(_env().get_template("cuda/kernels.cu.j2").render(ctx))


def emit(spec: Spec, out_dir: str | Path, target: Target | str = Target.C, precision: Precision | str = Precision.FP32,
         matmul: Matmul | str = Matmul.CUBLASLT) -> list[Path]:
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
