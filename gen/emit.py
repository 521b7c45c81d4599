"""Render the C and CUDA trainers from the templates.

Python computes every size, name, offset and expression here; the templates only print
them, and cformat lays the output out (aligned comments, wrapped tables), so that no
template aligns anything by hand.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jinja2

from . import __version__
from .cformat import format_c, format_make
from .enums import Init, Matmul, Mlp, Norm, Position, Precision, Target
from .errors import LlmgenError
from .fileio import write_atomic
from .spec import Spec, describe_blocks
from .tensors import Act, Param, _cuda_acts, activation_name, activations, num_params, numel, parameters, shape_comment

# Symbolic dimension -> C expression, for sizes that depend on B and T at run time.
C_DIMS = {"B": "B", "T": "T", "L": "NUM_LAYERS", "NH": "NUM_HEADS", "C": "CHANNELS", "HS": "HEAD_SIZE",
          "3C": "3 * CHANNELS", "4C": "4 * CHANNELS", "Vp": "PADDED_VOCAB_SIZE", "V": "VOCAB_SIZE",
          "maxT": "MAX_SEQ_LEN", "CR": "classifier_rows(B, T)", "KVH": "KV_HEADS", "QKV": "QKV_CHANNELS",
          "H": "MLP_HIDDEN", "2H": "2 * MLP_HIDDEN", "8C": "8 * CHANNELS"}

def layers(spec: Spec) -> tuple[str, ...]:
    """The layer templates under templates/layers/ that the spec uses, in file order."""
    return ("encoder", spec.norm.value, *(("rope",) if spec.position is Position.ROPE else ()), "matmul",
            "attention", spec.mlp.value, "residual", "classifier")
# The libFuzzer targets that `make fuzz` builds from test_gpt2.c, one per reader (see fuzz.c.j2).
FUZZERS = ("fuzz_model", "fuzz_state", "fuzz_shard", "fuzz_tokenizer")
# The CUDA kernel templates under templates/cuda/layers/, in file order.
CUDA_LAYERS = ("common", "reduce", "encoder", "layernorm", "gelu", "residual", "matmul", "attention",
               "classifier", "adamw", "norm", "decode")


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


# The header line after which an emitted trainer holds its spec, one TOML line per comment
# line indented by two spaces: `llmgen verify --trainer` reads it back (verify.spec_in_header).
SPEC_MARKER = "The spec it was generated from (llmgen verify --trainer reads it back from here):"


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
    """Tile and block sizes of the emitted gemm (see layers/matmul.c.j2), one register tile per
    instruction set, chosen by the preprocessor when the file is compiled.

    A tile of MR x NR sums takes MR * NR / (floats per vector) registers; the loads of B take
    NR / (floats per vector) more and the broadcast of A one. With AVX-512's 32 registers of
    16 floats, 12 x 32 takes 24 + 2 + 1 = 27; with AVX2's 16 registers of 8 floats, 6 x 16 takes
    12 + 2 + 1 = 15; SSE's 16 registers of 4 floats, 6 x 8 the same. Each step of k then does
    MR * NR / (floats per vector) FMAs for MR + NR / (floats per vector) loads (24 for 14, 12
    for 8). Measured on a 2-core AMD EPYC (Zen 4), 1024^3 on one thread: AVX-512 12 x 32 about
    89 GFLOP/s (8 x 32: 88, 16 x 16: 94, 14 x 32: 86, 6 x 64: 83); AVX2 6 x 16 about 83 (the
    old 4 x 24: 57, 5 x 16: 75, 3 x 32: 56). On a Zen 5 (512-bit FMA units, one thread, the
    model's products at 1,024 rows, peak about 236): 12 x 32 about 195, 8 x 32 and 14 x 32 the
    same, 16 x 16 176; the tile alone on operands in L2 reaches 96% of the peak, and smaller
    blocks (KC 384 to 1024 with B blocks of 0.5 to 1 MiB, to stay in L2) were no faster. KC keeps the
    whole K of every forward matmul (up to the MLP's 4C) in one block, so that the forward's
    transposed tiles are stored once; only the classifier's dinp (K = Vp) and dweight with
    many rows take several blocks. A packed block of B is at most 4 MiB, to stay in the L2
    and L3 caches.
    """
    kc = 4 * spec.n_embd
    pack = max(1 << 20, kc * 32)

    def tile(mr, nr, vec, regs):
        return {"mr": mr, "nr": nr, "doc": f"{mr} x {nr} sums in {mr * nr // vec} of {regs}"}
    return {"avx512": tile(12, 32, 16, 32), "avx2": tile(6, 16, 8, 16), "sse": tile(6, 8, 4, 16),
            "kc": kc, "pack": pack, "kc_doc": "4C, the longest K of a forward", "pack_doc": f"{pack * 4 / 2**20:g} MiB"}


def attention_sizes(spec: Spec) -> dict:
    """Blocks of the C trainer's flash attention (layers/attention.c.j2): 48 queries and 96 keys,
    whole numbers of the gemm's register tiles on every instruction set (MR 12 or 6, NR 32, 16
    or 8), so that the products of the blocks have few partial tiles."""
    bq, bk, hs = 48, 96, spec.head_size
    return {"bq": bq, "bk": bk, "max_n": max(bk, hs), "max_k": max(bq, bk, hs),
            "bq_doc": "4 register tiles of 12 rows, 8 of 6", "bk_doc": "3 tiles of 32 columns, 6 of 16; 8 or 16 rows"}


def c_literal(x: float, suffix: str = "f") -> str:
    """The shortest C literal of a float that reads back as it: 1e-5 -> 1e-5f, 10000.0 -> 10000.0f."""
    text = repr(float(x))
    text = re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), text)
    return text + suffix


def _arch_header(spec: Spec) -> list[dict]:
    """A variant checkpoint's header slots 8 to 19 (fileio.ARCH_SLOTS), with what each holds."""
    if spec.is_gpt2:
        return []
    from .fileio import model_header
    values = [int(v) for v in model_header(spec)[8:20]]
    docs = ["the layout of these slots", f"norm: {spec.norm.value}", f"position: {spec.position.value}",
            f"mlp: {spec.mlp.value}", "mlp_hidden", "kv_heads", "bias", "tie_embeddings",
            f"norm_eps {spec.norm_eps!r} as a float64: its low half", "its high half",
            f"rope_theta {spec.rope_theta!r} as a float64: its low half", "its high half"]
    return [{"index": 8 + i, "value": v, "doc": d} for i, (v, d) in enumerate(zip(values, docs))]


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
    KV = spec.kv_head_count * spec.head_size
    constants.append(("KV_HEADS", spec.kv_head_count, "key/value heads" + (
        ": each serves NUM_HEADS / KV_HEADS query heads" if spec.kv_head_count != spec.n_head else
        ": as many as the query heads")))
    if not spec.is_gpt2:
        if spec.kv_head_count != spec.n_head:
            constants.append(("QKV_CHANNELS", spec.n_embd + 2 * KV, "QKV = C + 2 * KV_HEADS * HS: a row of q, k, v"))
        if spec.mlp_channels != 4 * spec.n_embd:
            constants.append(("MLP_HIDDEN", spec.mlp_channels, "H: the MLP's hidden channels"))
        if spec.position is Position.ROPE:
            constants.append(("ROPE_THETA", c_literal(spec.rope_theta, ""), "the rotary angles' base"))
    return {
        "version": __version__,
        "origin": origin(spec),
        "spec": spec,
        "spec_marker": SPEC_MARKER,
        "spec_lines": spec.to_toml().splitlines(),
        "program": program,
        "n_params": num_params(spec),
        "params": [_param(p, spec) for p in params],
        "layer_params": [_param(p, spec) for p in params if p.per_layer],
        "constants": [{"name": n, "value": v, "doc": d} for n, v, d in constants],
        "eot_token": spec.vocab_size - 1,
        "gpt2": spec.is_gpt2,
        "arch_header": _arch_header(spec),
        "blocks": describe_blocks(spec),
        "model_kind": "GPT-2" if spec.is_gpt2 else "transformer",
    }


def c_context(spec: Spec) -> dict:
    """What the C trainer's templates print."""
    ctx = _common_context(spec, "train_gpt2")
    acts = [_act(a) for a in activations(spec, Target.C)]
    gqa = spec.kv_head_count != spec.n_head
    hidden = "4 * C" if spec.mlp_channels == 4 * spec.n_embd else "MLP_HIDDEN"
    ctx.update({
        "target": "c",
        "bf16": False,
        "acts": acts,
        "layer_acts": [a for a in acts if a["per_layer"]],
        "layers": layers(spec),
        "norm": spec.norm.value,
        "norm_bias": spec.norm is Norm.LAYERNORM and spec.bias,
        "norm_eps_c": c_literal(spec.norm_eps),
        "norm_eps_text": c_literal(spec.norm_eps, ""),
        "bias": spec.bias,
        "learned_positions": spec.position is Position.LEARNED,
        "rope": spec.position is Position.ROPE,
        "mlp": spec.mlp.value,
        "act": activation_name(spec),
        "gqa": gqa,
        "classifier": "wte" if spec.tie_embeddings else "lm_head",
        "qkv_stride": "QKV_CHANNELS" if gqa else "3 * C",
        "qkv_stride_c": "QKV_CHANNELS" if gqa else "3 * CHANNELS",
        "qkv_dim": "QKV" if gqa else "3C",
        "hidden_c": hidden,
        "fc_oc": (f"2 * {hidden}" if hidden == "MLP_HIDDEN" else "8 * C") if spec.mlp is Mlp.SWIGLU else hidden,
        # the same sizes outside a function with a local C
        "qkv_c": "QKV_CHANNELS" if gqa else "3 * CHANNELS",
        "hidden_cc": hidden.replace("C", "CHANNELS") if hidden == "4 * C" else hidden,
        "fc_c": ((f"2 * {hidden}" if hidden == "MLP_HIDDEN" else "8 * CHANNELS") if spec.mlp is Mlp.SWIGLU
                 else hidden.replace("C", "CHANNELS") if hidden == "4 * C" else hidden),
        "hidden_dim": "4C" if hidden == "4 * C" else "H",
        "fc_dim": (("2H" if hidden == "MLP_HIDDEN" else "8C") if spec.mlp is Mlp.SWIGLU
                   else "4C" if hidden == "4 * C" else "H"),
        "gemm": gemm_sizes(spec),
        "attention": attention_sizes(spec),
        "model_version": 3,
        "default_T": min(64, spec.max_seq_len),
        "classifier_rows": spec.classifier_rows,
    })
    return ctx


@dataclass(frozen=True)
class CudaBuild:
    """Choices of the CUDA trainer besides its precision and matmul path.

    tf32: the fp32 cuBLASLt matmuls run on the tensor cores in TF32 (llm.c's default); off,
      they are exact fp32 (as `llmgen verify` builds them). A bf16 trainer has no fp32 matmuls.
    recompute_gelu: the forward keeps one layer's GELU output instead of every layer's, and
      the backward recomputes it from the pre-activation (llm.c's -r 1): less memory, one
      more GELU per layer in the backward.
    """
    tf32: bool = True
    recompute_gelu: bool = False


# The CudaBuild of the command being run: render() and emit() take only precision and
# matmul, so the command line's CUDA options (cli.cuda_options) set this for the duration
# of a command, and cuda_context reads it.
_CUDA_BUILD: contextvars.ContextVar[CudaBuild] = contextvars.ContextVar("llmgen_cuda_build", default=CudaBuild())


@contextlib.contextmanager
def cuda_build(**choices):
    """Within the block, the CUDA trainer is emitted with these CudaBuild choices (the others
    as they are): `with cuda_build(tf32=False): emit(...)`."""
    token = _CUDA_BUILD.set(dataclasses.replace(_CUDA_BUILD.get(), **choices))
    try:
        yield
    finally:
        _CUDA_BUILD.reset(token)


def current_cuda_build() -> CudaBuild:
    return _CUDA_BUILD.get()


# Tensor-core attention (bf16): head sizes it takes, and the most registers per thread its
# tiles may plan for (of 255), leaving the rest for addresses, loop counters and temporaries.
FLASH_HEAD_SIZES = range(16, 129, 16)
FLASH_REGISTER_PLAN = 168


def flash_tiles(spec: Spec, precision: Precision | str) -> dict | None:
    """Tile sizes of the tensor-core attention (cuda/layers/attention.cu.j2), or None where it
    does not apply (fp32, or a head size that is not a multiple of 16 up to 128): then the
    simple kernels run.

    A block is FLASH_WARPS warps; each warp owns 16 rows (the M of one mma.m16n8k16) of
    queries (forward, dq) or of keys (dk, dv). Per thread a 16 x N fp32 accumulator takes N/2
    registers and a 16 x K bf16 operand K/4. The other side's rows stream through shared
    memory in tiles, as large as the registers allow (64 rows, else 32, else 16):
      forward  Q (HS/4), O (HS/2), S of a key tile (BK/2) and its bf16 copy P (BK/4)
      dq       Q, dO (HS/4 each), dQ (HS/2), S and dP of a key tile (BK/2 each), dS (BK/4)
      dk, dv   dK, dV (HS/2 each), S^T and dP^T of a query tile (BQ/2 each), P^T, dS^T (BQ/4 each);
               this block's K and V rows wait in shared memory, read as they are needed
    Shared memory stays within the 48 KiB a kernel gets without asking: rows of HS + 8 bf16
    (the padding makes the fragment loads free of bank conflicts).
    """
    HS = spec.head_size
    if Precision.parse(precision, "precision") is not Precision.BF16 or HS not in FLASH_HEAD_SIZES:
        return None
    warps = 4
    rows = 16 * warps
    stride = HS + 8

    def largest(registers, smem_rows):
        for tile in (64, 32, 16):
            if registers(tile) <= FLASH_REGISTER_PLAN and smem_rows(tile) * stride * 2 <= 48 * 1024:
                return tile
        raise AssertionError(f"no flash tile fits head size {HS}")

    bk = largest(lambda t: HS // 4 + HS // 2 + t // 2 + t // 4, lambda t: 2 * t)
    bk_dq = largest(lambda t: HS // 2 + HS // 2 + t + t // 4, lambda t: 2 * t)
    bq_dkdv = largest(lambda t: HS + t + t // 2, lambda t: 2 * rows + 2 * t)
    return {"warps": warps, "rows": rows, "bk": bk, "bk_dq": bk_dq, "bq_dkdv": bq_dkdv, "stride": stride}


def attention_lanes(spec: Spec) -> tuple[int, int, int, int]:
    """The simple attention kernels' shape: (lanes, slice, rows, key_rows). `lanes` threads
    share one query (or key) row, each holding `slice` of its HEAD_SIZE channels (at most 16,
    so that the dk, dv kernel's four rows k, v, dk, dv stay in registers: 64 floats); `rows`
    rows make a block of at most 256 threads; `key_rows` rows of the other side pass through
    shared memory at a time (two tiles of floats: at most 32 KiB)."""
    HS = spec.head_size
    lanes = 1
    while lanes < 32 and lanes * 16 < HS:
        lanes *= 2
    slice_ = -(-HS // lanes)
    rows = max(8, min(64, 256 // lanes))
    key_rows = max(1, min(32, 4096 // HS))
    return lanes, slice_, rows, key_rows


def decode_shapes(spec: Spec, precision: Precision | str = Precision.FP32) -> dict:
    """Launch shapes of the generation kernels (cuda/layers/decode.cu.j2), which run one new
    position of every sample against the cache of keys and values.

    vec: floatX per load, 16 bytes' worth (8 bf16, 4 fp32) where HEAD_SIZE is a multiple of
      it: then C, 4C and every parameter tensor's offset are too (they are multiples of C),
      so each row the kernels read (a weight row, an input row, a cached key) starts 16-byte
      aligned; else 1.
    matvec: a warp per output channel (its weight row is read once, for every sample), 4
      warps a block, so that even C = 768 outputs make 192 blocks, more than the SMs of an
      H100 (132); 8 samples summed per pass over the row (8 sums per thread).
    attention: a block of `threads` threads per (sample, head, chunk of `threads` keys): one key
      a thread for the scores, then `groups` groups of HEAD_SIZE threads sum the values.
      Contexts longer than a chunk split over several blocks (flash decoding), whose partial
      softmax sums a second kernel combines, so that a long context still fills the GPU.
    """
    HS = spec.head_size
    per_load = 16 // (2 if Precision.parse(precision, "precision") is Precision.BF16 else 4)
    threads = max(128, -(-HS // 32) * 32)
    if threads > 1024:
        raise AssertionError(f"head size {HS} exceeds a block of the attention over the cache")
    return {"vec": per_load if HS % per_load == 0 else 1, "per_load": per_load, "matvec_warps": 4, "matvec_rows": 8,
            "threads": threads, "chunk": threads, "groups": threads // HS}


def kernel_constants(spec: Spec, precision: Precision | str = Precision.FP32) -> list[tuple[str, int, str]]:
    """Launch shapes of the CUDA kernels, with the reason for each, printed as #defines;
    the PyCUDA tests launch with them too (kernel_values). The attention's depend on the
    kernels it uses: the tensor-core ones (bf16, flash_tiles) or the simple ones."""
    constants = [
        ("BLOCK_SIZE", 256, "threads per block of the element-wise kernels"),
        ("LN_ROWS_PER_BLOCK", 8, "layernorm: one warp per row, 8 rows (256 threads) per block"),
        ("REDUCE_ROWS", 256, "column sums: rows per block (chunk) in the first stage"),
        ("CLASSIFIER_BLOCK", 512, "fused classifier: threads per row, each handling Vp / 512 logits"),
        ("NORM_BLOCKS", 512, "gradient norm: blocks in the first stage, a fixed number so the sum is deterministic"),
        ("TILE", 16, "tiled matmul: TILE x TILE outputs per block, one per thread"),
    ]
    flash = flash_tiles(spec, precision)
    if flash is None:
        lanes, slice_, rows, key_rows = attention_lanes(spec)
        constants += [
            ("ATT_BQ", rows, f"attention: query (or key) rows per block, {lanes} thread{'s' if lanes > 1 else ''} "
                             "each (at most 256 threads)"),
            ("ATT_BK", key_rows,
             "attention: key (or query) rows per shared-memory tile (two tiles of ATT_BK x HS floats: <= 32 KiB)"),
            ("HEAD_LANES", lanes, "attention: threads sharing a row, consecutive lanes of one warp; lane j holds "
                                  "channels j, j + HEAD_LANES, ..."),
            ("HEAD_SLICE", slice_, "attention: channels per thread, HEAD_SIZE / HEAD_LANES rounded up (at most 16)"),
        ]
    else:
        HS = spec.head_size
        constants += [
            ("FLASH_WARPS", flash["warps"], "tensor-core attention: warps per block, 16 query (or key) rows each"),
            ("FLASH_ROWS", flash["rows"], "tensor-core attention: query (or key) rows per block, 16 * FLASH_WARPS"),
            ("FLASH_BK", flash["bk"], f"forward: keys per shared-memory tile ({flash['bk'] // 2} fp32 scores "
                                      f"per thread, with Q and O of HS {HS}, in registers)"),
            ("FLASH_BK_DQ", flash["bk_dq"], f"dq: keys per shared-memory tile ({flash['bk_dq']} fp32 S and dP "
                                            "values per thread, with Q, dO and dQ, in registers)"),
            ("FLASH_BQ_DKDV", flash["bq_dkdv"], f"dk, dv: queries per shared-memory tile ({flash['bq_dkdv']} fp32 "
                                                "S^T and dP^T values per thread, with dK and dV, in registers)"),
            ("FLASH_STRIDE", flash["stride"], "shared-memory row: HEAD_SIZE + 8 bf16, so that the 8 rows of a "
                                              "fragment load fall in different banks"),
        ]
    d = decode_shapes(spec, precision)
    vec_doc = (f"generation: floatX per load, 16 bytes (HEAD_SIZE {spec.head_size} is a multiple of {d['vec']}: "
               "every row read starts 16-byte aligned)" if d["vec"] > 1 else
               f"generation: floatX per load, one (HEAD_SIZE {spec.head_size} is not a multiple of "
               f"{d['per_load']}, so rows are not all 16-byte aligned)")
    constants += [
        ("DECODE_VEC", d["vec"], vec_doc),
        ("MATVEC_WARPS", d["matvec_warps"], "matrix-vector products: warps per block, one output channel each "
                                            f"(C = {spec.n_embd} outputs: {-(-spec.n_embd // d['matvec_warps'])} "
                                            "blocks)"),
        ("MATVEC_ROWS", d["matvec_rows"], "matrix-vector products: samples summed per pass over a weight row "
                                          "(a sum each per thread)"),
        ("DECODE_THREADS", d["threads"], "attention over the cache: threads per block, at least HEAD_SIZE"),
        ("DECODE_CHUNK", d["chunk"], "attention over the cache: keys per block, one per thread for the scores; "
                                     "a longer context takes several blocks"),
        ("DECODE_GROUPS", d["groups"], "attention over the cache: groups of HEAD_SIZE threads that sum the values, "
                                       "DECODE_THREADS / HEAD_SIZE"),
    ]
    return constants


def kernel_values(spec: Spec, precision: Precision | str = Precision.FP32) -> dict[str, int]:
    return {name: value for name, value, _ in kernel_constants(spec, precision)}


def cuda_context(spec: Spec, precision: Precision | str = Precision.FP32, matmul: Matmul | str = Matmul.CUBLASLT,
                 build: CudaBuild | None = None) -> dict:
    """What the CUDA trainer's templates print: precision, matmul path, the build choices
    (those of the command being run unless given), its activations and device buffers."""
    precision = Precision.parse(precision, "precision")
    matmul = Matmul.parse(matmul, "matmul")
    build = build or current_cuda_build()
    ctx = _common_context(spec, "train_gpt2cu")
    bf16 = precision is Precision.BF16
    cublaslt = matmul is Matmul.CUBLASLT
    act_list = _cuda_acts(build.recompute_gelu)
    acts = [_act(a, "floatX") for a in act_list]
    C = spec.n_embd
    flash = flash_tiles(spec, precision)
    ctx.update({
        "target": "cuda",
        "precision": precision.value,
        "bf16": bf16,
        "model_version": 5 if bf16 else 3,
        "cublaslt": cublaslt,
        "matmul": matmul.value,
        # TF32 concerns the fp32 cuBLASLt matmuls only (the tiled kernel is exact fp32)
        "tf32": int(build.tf32 and cublaslt and not bf16),
        "recompute_gelu": build.recompute_gelu,
        "cuda_acts": acts,
        "layer_acts": [a for a in acts if a["per_layer"]],
        "kernel_constants": [{"name": n, "value": v, "doc": d} for n, v, d in kernel_constants(spec, precision)],
        "flash": flash,
        "flash_head_sizes": f"{FLASH_HEAD_SIZES.start}, {FLASH_HEAD_SIZES.start + FLASH_HEAD_SIZES.step}, ..., "
                            f"{FLASH_HEAD_SIZES[-1]}",
        "cublaslt_workspace": CUBLASLT_WORKSPACE,
        "matmul_plans": MATMUL_PLANS,
        # cuBLASLt's GELU epilogues need the leading dimension of the pre-GELU matrix (4C)
        # to be a multiple of 8
        "gelu_fusion": int(cublaslt and (4 * C) % 8 == 0),
        "layers": CUDA_LAYERS,
        "host": True,
        "default_T": spec.max_seq_len,
    })
    ctx["device_buffers"] = device_buffers(spec, bf16, cublaslt, act_list)
    ctx["kvcache_buffers"] = kvcache_buffers(spec, bf16)
    ctx["decode"] = decode_shapes(spec, precision)
    return ctx


CUBLASLT_WORKSPACE = 32 << 20  # bytes: cuBLASLt's scratch space for its algorithms (llm.c uses 32 MiB)
MATMUL_PLANS = 64  # cuBLASLt plans kept: the training step has about 15 matmul shapes, sampling one per length

# Bytes of the C types of the device buffers.
C_TYPE_BYTES = {"float": 4, "double": 8, "int": 4}


def device_buffers(spec: Spec, bf16: bool, cublaslt: bool, acts: tuple[Act, ...]) -> list[dict]:
    """Every device allocation of the CUDA trainer, in the order gpt2_alloc makes them (its
    table device_buffers): the pointer it sets, a C expression for its bytes at a batch of
    B x T, what it holds (for an out-of-memory message), a comment, its group (for `llmgen
    info`), and `bytes`, a function of (B, T) for the same number. The trainer prints their
    sum as it starts; `llmgen info --target cuda` prints it too."""
    type_bytes = {**C_TYPE_BYTES, "floatX": 2 if bf16 else 4}
    k = kernel_values(spec)
    out = []

    def add(pointer, shape, ctype, what, group, doc=""):
        """A buffer of a tensor shape (symbolic dimensions, see C_DIMS and Spec.dims)."""
        def nbytes(B, T, shape=shape, ctype=ctype):
            dims = {**spec.dims, "B": B, "T": T}
            return numel(shape, dims) * type_bytes[ctype]
        out.append({"pointer": pointer, "size": f"{c_size(shape)} * sizeof({ctype})", "what": what, "group": group,
                    "doc": doc or shape_comment(shape), "bytes": nbytes})

    def add_fixed(pointer, size, nbytes, what, group, doc):
        """A buffer whose size does not depend on the batch: its C expression and its bytes."""
        out.append({"pointer": pointer, "size": size, "what": what, "group": group, "doc": doc,
                    "bytes": lambda B, T: nbytes})

    n = num_params(spec)
    add_fixed("model->params_memory", "NUM_PARAMETERS * sizeof(floatX)", n * type_bytes["floatX"], "the parameters",
              "parameters", "(NUM_PARAMETERS)")
    add_fixed("model->grads_memory", "NUM_PARAMETERS * sizeof(float)", n * 4, "the gradients", "gradients",
              "(NUM_PARAMETERS)")
    if bf16:
        add_fixed("model->master_memory", "NUM_PARAMETERS * sizeof(float)", n * 4, "the master weights",
                  "master weights", "(NUM_PARAMETERS)")
    add_fixed("model->m_memory", "NUM_PARAMETERS * sizeof(float)", n * 4, "AdamW's m", "AdamW m and v",
              "(NUM_PARAMETERS)")
    add_fixed("model->v_memory", "NUM_PARAMETERS * sizeof(float)", n * 4, "AdamW's v", "AdamW m and v",
              "(NUM_PARAMETERS)")
    for a in acts:
        add(f"model->acts.{a.name}", a.shape, "float" if a.fp32 else "floatX", f"the activation {a.name}",
            "activations")
    add("model->dresidual", ("B", "T", "C"), "floatX", "the backward pass", "backward buffers")
    add("model->dscratch", ("B", "T", "C"), "floatX", "the backward pass", "backward buffers")
    add("model->dscratch4", ("B", "T", "4C"), "floatX", "the backward pass", "backward buffers")
    add("model->att_delta", ("B", "NH", "T"), "float", "the backward pass", "backward buffers")
    rows = k["REDUCE_ROWS"]
    out.append({"pointer": "model->reduce_scratch", "size": "(size_t)reduce_chunks(B * T) * 4 * CHANNELS * sizeof(float)",
                "what": "the backward pass", "group": "backward buffers", "doc": "(chunks,4C)",
                "bytes": lambda B, T: -(-(B * T) // rows) * 4 * spec.n_embd * 4})
    add_fixed("model->norm_partial", "NORM_BLOCKS * sizeof(double)", k["NORM_BLOCKS"] * 8, "the gradient norm",
              "backward buffers", "(NORM_BLOCKS)")
    add("model->inputs_gpu", ("B", "T"), "int", "the inputs", "token ids")
    add("model->targets_gpu", ("B", "T"), "int", "the targets", "token ids")
    add("model->buckets.tokens_gpu", ("Vp",), "int", "token buckets", "token ids")
    add_fixed("model->buckets.starts_gpu", "(PADDED_VOCAB_SIZE + 1) * sizeof(int)", (spec.padded_vocab_size + 1) * 4,
              "token buckets", "token ids", "(Vp+1)")
    add("model->buckets.positions_gpu", ("B", "T"), "int", "token buckets", "token ids")
    if cublaslt:
        add_fixed("cublaslt_workspace", "CUBLASLT_WORKSPACE_SIZE", CUBLASLT_WORKSPACE, "cuBLASLt's workspace",
                  "cuBLASLt workspace", f"({CUBLASLT_WORKSPACE >> 20} MiB)")
    return out


def kvcache_buffers(spec: Spec, bf16: bool) -> list[dict]:
    """The device buffers of the CUDA trainer's cache of keys and values, in the order
    kvcache_alloc makes them (its table kvcache_buffers): allocated only while it samples, for
    `rows` samples and a window of `window` positions. Each: the pointer it sets, a C
    expression for its bytes (of rows, window and chunks, the attention's blocks of keys at the
    longest context), what it holds, a shape comment, and `bytes`, a function of (rows, window)."""
    x = 2 if bf16 else 4
    C, L, NH, HS, Vp = spec.n_embd, spec.n_layer, spec.n_head, spec.head_size, spec.padded_vocab_size
    chunk = decode_shapes(spec, "bf16" if bf16 else "fp32")["chunk"]
    out = []

    def add(pointer, size, ctype, what, doc, nbytes):
        out.append({"pointer": f"c->{pointer}", "size": f"{size} * sizeof({ctype})", "what": what, "doc": doc,
                    "bytes": nbytes})

    kv = "(size_t)NUM_LAYERS * rows * NUM_HEADS * window * HEAD_SIZE"
    add("keys", kv, "floatX", "the cache of keys", "(L,rows,NH,window,HS)", lambda r, w: L * r * NH * w * HS * x)
    add("values", kv, "floatX", "the cache of values", "(L,rows,NH,window,HS)", lambda r, w: L * r * NH * w * HS * x)
    add("x", "(size_t)rows * CHANNELS", "floatX", "generation", "(rows,C)", lambda r, w: r * C * x)
    add("xn", "(size_t)rows * CHANNELS", "floatX", "generation", "(rows,C)", lambda r, w: r * C * x)
    add("ln_mean", "(size_t)rows", "float", "generation", "(rows)", lambda r, w: r * 4)
    add("ln_rstd", "(size_t)rows", "float", "generation", "(rows)", lambda r, w: r * 4)
    add("qkv", "(size_t)rows * 3 * CHANNELS", "floatX", "generation", "(rows,3C)", lambda r, w: r * 3 * C * x)
    add("att", "(size_t)rows * CHANNELS", "floatX", "generation", "(rows,C)", lambda r, w: r * C * x)
    add("fch_gelu", "(size_t)rows * 4 * CHANNELS", "floatX", "generation", "(rows,4C)", lambda r, w: r * 4 * C * x)
    add("att_partial", "(size_t)rows * NUM_HEADS * chunks * (HEAD_SIZE + 2)", "float", "generation",
        "(rows,NH,chunks,HS+2)", lambda r, w: r * NH * -(-w // chunk) * (HS + 2) * 4)
    add("logits", "(size_t)rows * PADDED_VOCAB_SIZE", "floatX", "generation", "(rows,Vp)", lambda r, w: r * Vp * x)
    add("tokens_gpu", "(size_t)rows", "int", "generation", "(rows)", lambda r, w: r * 4)
    return out


def kvcache_memory(spec: Spec, rows: int, window: int, precision: Precision | str = Precision.FP32) -> int:
    """Bytes the CUDA trainer allocates on the device while it samples `rows` samples over a
    window of `window` positions (on top of device_memory's)."""
    bf16 = Precision.parse(precision, "precision") is Precision.BF16
    return sum(b["bytes"](rows, window) for b in kvcache_buffers(spec, bf16))


def device_memory(spec: Spec, B: int, T: int, precision: Precision | str = Precision.FP32,
                  matmul: Matmul | str = Matmul.CUBLASLT, build: CudaBuild | None = None) -> list[tuple[str, int]]:
    """Bytes the CUDA trainer allocates on the device for batches of B x T, by group, in
    gpt2_alloc's order (the sum is what it prints as it starts)."""
    groups: dict[str, int] = {}
    for buf in cuda_context(spec, precision, matmul, build)["device_buffers"]:
        groups[buf["group"]] = groups.get(buf["group"], 0) + buf["bytes"](B, T)
    return list(groups.items())


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
        if not spec.is_gpt2:
            keys = ", ".join(f"{k} = {v.value if hasattr(v, 'value') else v}" for k, v in spec.arch().items())
            raise LlmgenError(f"{spec.source or spec.name}: --target {target.value}: the CUDA trainer computes GPT-2's "
                              f"blocks only, and this spec sets {keys} (the C trainer computes them: --target c)")
        cctx = cuda_context(spec, precision, matmul)
        files.update((name, _render(env, "cuda/" + name, cctx)) for name in ("train_gpt2.cu", "test_gpt2.cu"))
        make_parts.append(("make/cuda.mk", cctx))
    programs = {"make/c.mk": ["train_gpt2", "test_gpt2", "bench_gpt2", *FUZZERS], "make/cuda.mk": ["train_gpt2cu", "test_gpt2cu"]}
    parts = [env.get_template(name + ".j2").render(ctx) for name, ctx in make_parts]
    files["Makefile"] = format_make(env.get_template("Makefile.j2").render(
        version=__version__, origin=origin(spec), parts=parts,
        default=[programs[name][0] for name, _ in make_parts],
        programs=[p for name, _ in make_parts for p in programs[name]],
        phony=["all", "clean"] + (["fuzz", "mpi"] if target.c else []) + (["nvcc-check", "cuda-info", "nccl"] if target.cuda else [])))
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
    env = {**os.environ, "LC_ALL": "C"}  # the compiler's messages in ASCII, as llmgen quotes them
    result = subprocess.run(["make", "-s", target, f"CC={cc}", *args], cwd=out_dir, capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise LlmgenError(f"{out_dir}: make {target} failed:\n{result.stdout}{result.stderr}")
    return out_dir / target
