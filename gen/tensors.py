"""The one canonical list of tensors, as a function of the spec.

`parameters(spec)` is in llm.c's checkpoint order. It drives the C structs and pointer
tables, the per-layer views, the checkpoint reader and writer, the random init, weight decay,
the FLOP count, the NumPy reference and the Hugging Face names.
`activations(spec, target)` is the activation list of the C or CUDA program, in the order of
its activation buffer; those with `grad` also have a gradient in the C trainer's second buffer.
Shapes are tuples of symbolic dimension names (see Spec.dims, plus B and T for activations);
a leading "L" means one slice per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .enums import Init, Mlp, Norm, Position, Target


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[str, ...]
    doc: str
    init: Init
    decay: bool = False          # AdamW's weight decay applies (the 2-D weight matrices)
    matmul: bool = False         # a matmul weight: 6 FLOPs per element per token (2 forward, 4 backward)
    hf: tuple[str, ...] = ()     # Hugging Face names ("{n}": the block index), stacked along the rows
    hf_transposed: bool = False  # stored (in, out) there, (out, in) here

    @property
    def per_layer(self) -> bool:
        return self.shape[0] == "L"

    def init_std(self, n_layer: int) -> float | None:
        """The standard deviation of the normal init, None for ones and zeros."""
        if self.init is Init.NORMAL:
            return 0.02
        if self.init is Init.RESIDUAL:
            return 0.02 / math.sqrt(2 * n_layer)
        return None

    def init_formula(self) -> str:
        """The init as a reader checks it, in the emitted files' names."""
        return {Init.NORMAL: "0.02", Init.RESIDUAL: "0.02 / sqrt(2 * NUM_LAYERS)",
                Init.ONES: "ones", Init.ZEROS: "zeros"}[self.init]


@dataclass(frozen=True)
class Act:
    name: str
    shape: tuple[str, ...]
    doc: str
    grad: bool = True      # the C backward keeps a gradient buffer for it
    fp32: bool = False     # CUDA: stays fp32 in the bf16 trainer (statistics and losses)

    @property
    def per_layer(self) -> bool:
        return self.shape[0] == "L"


def sizes(shape: tuple[str, ...], dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] for d in shape)


def numel(shape: tuple[str, ...], dims: dict[str, int]) -> int:
    return math.prod(sizes(shape, dims))  # exact: np.prod's int64 would wrap for absurd sizes


def shape_comment(shape: tuple[str, ...]) -> str:
    return "(" + ",".join(shape) + ")"


# ---- parameters -----------------------------------------------------------------------
def _gpt2_hf(name: str) -> tuple[str, ...]:
    return (name,)


def _llama_hf(*names: str) -> tuple[str, ...]:
    return tuple(f"model.layers.{{n}}.{n}" if not n.startswith(("model.", "lm_head")) else n for n in names)


def hf_family(spec) -> str | None:
    """The Hugging Face architecture whose layout holds the spec's tensors: "gpt2"
    (GPT2LMHeadModel) for GPT-2's blocks, "llama" (LlamaForCausalLM) for RMSNorm, rotary
    positions and SwiGLU, or None when neither does."""
    if spec.is_gpt2 or spec.arch() == {"tie_embeddings": False}:
        return "gpt2"  # (GPT2LMHeadModel with tie_word_embeddings false holds an untied classifier)
    if spec.norm is Norm.RMSNORM and spec.position is Position.ROPE and spec.mlp is Mlp.SWIGLU:
        return "llama"
    return None


def parameters(spec) -> tuple[Param, ...]:
    """The parameter tensors of the spec's model, in checkpoint order (llm.c's for GPT-2; a
    variant leaves out what it does not have and adds an untied classifier at the end)."""
    gpt2 = hf_family(spec) == "gpt2"
    llama = hf_family(spec) == "llama"

    def hf(gpt2_name: str, *llama_names: str) -> tuple[str, ...]:
        return _gpt2_hf(gpt2_name) if gpt2 else _llama_hf(*llama_names) if llama else ()
    layernorm = spec.norm is Norm.LAYERNORM
    norm = "layernorm" if layernorm else "rmsnorm"
    norm_bias = layernorm and spec.bias
    qkv = "3C" if spec.kv_head_count == spec.n_head else "QKV"
    hidden = "4C" if spec.mlp_channels == 4 * spec.n_embd else "H"
    fc_rows = ("2" + hidden if hidden == "H" else "8C") if spec.mlp is Mlp.SWIGLU else hidden
    tied = spec.tie_embeddings
    P = Param
    out = [P("wte", ("Vp", "C"), "token embedding; also the output classifier (tied)" if tied else "token embedding",
             Init.NORMAL, decay=True, matmul=tied, hf=hf("wte.weight", "model.embed_tokens.weight"))]
    if spec.position is Position.LEARNED:
        out.append(P("wpe", ("maxT", "C"), "position embedding", Init.NORMAL, decay=True, hf=hf("wpe.weight")))
    out.append(P("ln1w", ("L", "C"), f"{norm} 1 scale", Init.ONES, hf=hf("h.{n}.ln_1.weight", "input_layernorm.weight")))
    if norm_bias:
        out.append(P("ln1b", ("L", "C"), f"{norm} 1 shift", Init.ZEROS, hf=hf("h.{n}.ln_1.bias")))
    out.append(P("qkvw", ("L", qkv, "C"), "attention q,k,v projection weight" if qkv == "3C" else
                 "attention q,k,v projection weight: q (C rows), then k and v (KV_HEADS * HS rows each)",
                 Init.NORMAL, decay=True, matmul=True,
                 hf=hf("h.{n}.attn.c_attn.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                       "self_attn.v_proj.weight"), hf_transposed=gpt2))
    if spec.bias:
        out.append(P("qkvb", ("L", qkv), "attention q,k,v projection bias", Init.ZEROS,
                     hf=hf("h.{n}.attn.c_attn.bias", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
                           "self_attn.v_proj.bias")))
    out.append(P("attprojw", ("L", "C", "C"), "attention output projection weight", Init.RESIDUAL, decay=True,
                 matmul=True, hf=hf("h.{n}.attn.c_proj.weight", "self_attn.o_proj.weight"), hf_transposed=gpt2))
    if spec.bias:
        out.append(P("attprojb", ("L", "C"), "attention output projection bias", Init.ZEROS,
                     hf=hf("h.{n}.attn.c_proj.bias", "self_attn.o_proj.bias")))
    out.append(P("ln2w", ("L", "C"), f"{norm} 2 scale", Init.ONES,
                 hf=hf("h.{n}.ln_2.weight", "post_attention_layernorm.weight")))
    if norm_bias:
        out.append(P("ln2b", ("L", "C"), f"{norm} 2 shift", Init.ZEROS, hf=hf("h.{n}.ln_2.bias")))
    swiglu = spec.mlp is Mlp.SWIGLU
    out.append(P("fcw", ("L", fc_rows, "C"), "MLP up projection weight" if not swiglu else
                 "MLP gate and up projection weights, the gate's rows first", Init.NORMAL, decay=True, matmul=True,
                 hf=hf("h.{n}.mlp.c_fc.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"), hf_transposed=gpt2))
    if spec.bias:
        out.append(P("fcb", ("L", fc_rows), "MLP up projection bias" if not swiglu else
                     "MLP gate and up projection biases", Init.ZEROS,
                     hf=hf("h.{n}.mlp.c_fc.bias", "mlp.gate_proj.bias", "mlp.up_proj.bias")))
    out.append(P("fcprojw", ("L", "C", hidden), "MLP down projection weight", Init.RESIDUAL, decay=True, matmul=True,
                 hf=hf("h.{n}.mlp.c_proj.weight", "mlp.down_proj.weight"), hf_transposed=gpt2))
    if spec.bias:
        out.append(P("fcprojb", ("L", "C"), "MLP down projection bias", Init.ZEROS,
                     hf=hf("h.{n}.mlp.c_proj.bias", "mlp.down_proj.bias")))
    out.append(P("lnfw", ("C",), f"final {norm} scale", Init.ONES, hf=hf("ln_f.weight", "model.norm.weight")))
    if norm_bias:
        out.append(P("lnfb", ("C",), f"final {norm} shift", Init.ZEROS, hf=hf("ln_f.bias")))
    if not tied:
        out.append(P("lm_head", ("Vp", "C"), "output classifier (untied)", Init.NORMAL, decay=True, matmul=True,
                     hf=("lm_head.weight",) if gpt2 or llama else ()))
    return tuple(out)


def gpt2_parameters() -> tuple[Param, ...]:
    """GPT-2's parameter tensors (those of every spec with GPT-2's blocks), in checkpoint order."""
    class _GPT2:  # the blocks of any GPT-2 spec; the sizes do not matter for the list
        is_gpt2 = True
        norm, position, mlp, bias, tie_embeddings = Norm.LAYERNORM, Position.LEARNED, Mlp.GELU, True, True
        n_head = kv_head_count = 1
        n_embd, mlp_channels = 1, 4
    return parameters(_GPT2())


# ---- activations ----------------------------------------------------------------------
_C_ACTS = (
    Act("encoded", ("B", "T", "C"), "token + position embedding"),
    Act("ln1", ("L", "B", "T", "C"), "layernorm 1 output"),
    Act("ln1_mean", ("L", "B", "T"), "layernorm 1 mean", grad=False, fp32=True),
    Act("ln1_rstd", ("L", "B", "T"), "layernorm 1 reciprocal standard deviation", grad=False, fp32=True),
    Act("qkv", ("L", "B", "T", "3C"), "q, k, v for every position"),
    Act("atty", ("L", "B", "T", "C"), "attention output, heads concatenated"),
    Act("att_lse", ("L", "B", "NH", "T"), "attention softmax statistic: log of the sum of exp(scores) per query",
        grad=False, fp32=True),
    Act("residual2", ("L", "B", "T", "C"), "residual stream after attention (the projection added in place)"),
    Act("ln2", ("L", "B", "T", "C"), "layernorm 2 output"),
    Act("ln2_mean", ("L", "B", "T"), "layernorm 2 mean", grad=False, fp32=True),
    Act("ln2_rstd", ("L", "B", "T"), "layernorm 2 reciprocal standard deviation", grad=False, fp32=True),
    Act("fch", ("L", "B", "T", "4C"), "MLP hidden pre-activation"),
    Act("fch_gelu", ("L", "B", "T", "4C"), "MLP hidden after GELU"),
    Act("residual3", ("L", "B", "T", "C"), "residual stream after the MLP (the projection added in place)"),
    Act("lnf", ("B", "T", "C"), "final layernorm output"),
    Act("lnf_mean", ("B", "T"), "final layernorm mean", grad=False, fp32=True),
    Act("lnf_rstd", ("B", "T"), "final layernorm reciprocal standard deviation", grad=False, fp32=True),
    Act("logits", ("CR", "Vp"), "classifier logits, a chunk of at most CLASSIFIER_ROWS positions at a time; in the backward their "
        "gradient", grad=False),
    Act("losses", ("B", "T"), "cross-entropy loss at each position", grad=False, fp32=True),
)


def _cuda_acts(recompute_gelu: bool = False) -> tuple[Act, ...]:
    """The CUDA trainer keeps the C trainer's activations but for the logits: it keeps those of
    every position, which its fused classifier turns into their gradient in place. With
    recompute_gelu, fch_gelu holds one layer (the one in use) instead of every layer: the
    backward recomputes it."""
    out = []
    for a in _C_ACTS:
        if a.name == "logits":
            a = Act("logits", ("B", "T", "Vp"), "classifier logits; after the classifier's backward, their gradient",
                    grad=False)
        if a.name == "fch_gelu" and recompute_gelu:
            a = Act("fch_gelu", ("B", "T", "4C"), "MLP hidden after GELU, of the layer in use (the backward "
                    "recomputes it)")
        out.append(a)
    return tuple(out)


_CUDA_ACTS = _cuda_acts()


def activation_name(spec) -> str:
    """The MLP's hidden activation: fch_gelu, fch_swiglu or fch_relu2."""
    return f"fch_{spec.mlp.value}"


def activations(spec, target: Target = Target.C) -> tuple[Act, ...]:
    """The activation tensors of the C or the CUDA trainer, in buffer order (the CUDA trainer
    computes GPT-2's blocks only)."""
    if target is Target.CUDA:
        return _CUDA_ACTS
    if spec is None or spec.is_gpt2:
        return _C_ACTS
    layernorm = spec.norm is Norm.LAYERNORM
    qkv = "3C" if spec.kv_head_count == spec.n_head else "QKV"
    hidden = "4C" if spec.mlp_channels == 4 * spec.n_embd else "H"
    fc_rows = ("2" + hidden if hidden == "H" else "8C") if spec.mlp is Mlp.SWIGLU else hidden
    norm = "layernorm" if layernorm else "rmsnorm"
    out = []
    for a in _C_ACTS:
        if a.name.endswith("_mean") and not layernorm:
            continue  # rmsnorm has no mean
        if a.name.startswith(("ln1", "ln2", "lnf")):
            a = Act(a.name, a.shape, a.doc.replace("layernorm", norm), a.grad, a.fp32)
        if a.name == "encoded" and spec.position is Position.ROPE:
            a = Act("encoded", a.shape, "token embedding (positions enter by rotating q and k)")
        if a.name == "qkv":
            doc = "q, k, v for every position" + (", q and k rotated by position" if spec.position is Position.ROPE else "")
            if qkv == "QKV":
                doc += ": q (C), then k and v (KV_HEADS * HS each)"
            a = Act("qkv", ("L", "B", "T", qkv), doc)
        if a.name == "fch":
            a = Act("fch", ("L", "B", "T", fc_rows), "MLP hidden pre-activation" if spec.mlp is not Mlp.SWIGLU
                    else "MLP gate and up projections, side by side")
        if a.name == "fch_gelu":
            a = Act(activation_name(spec), ("L", "B", "T", hidden), {
                Mlp.GELU: "MLP hidden after GELU", Mlp.SWIGLU: "MLP hidden: silu(gate) * up",
                Mlp.RELU2: "MLP hidden after ReLU squared"}[spec.mlp])
        out.append(a)
    return tuple(out)


# ---- counts and views -----------------------------------------------------------------
def param_shapes(spec) -> dict[str, tuple[int, ...]]:
    dims = spec.dims
    return {t.name: sizes(t.shape, dims) for t in parameters(spec)}


def num_params(spec, padded: bool = True) -> int:
    """Parameters of the model; with padded=False the padded vocab rows are not counted."""
    dims = spec.dims if padded else {**spec.dims, "Vp": spec.vocab_size}
    return sum(numel(t.shape, dims) for t in parameters(spec))


def num_acts(spec, B: int, T: int, target: Target = Target.C, grads: bool = False) -> int:
    """Floats (elements) of the activations for a batch of B x T; with grads, of the
    activation gradients the C backward keeps."""
    dims = {**spec.dims, "B": B, "T": T, "CR": min(B * T, spec.classifier_rows)}
    return sum(numel(a.shape, dims) for a in activations(spec, target) if a.grad or not grads)


def unflatten(flat: np.ndarray, spec) -> dict[str, np.ndarray]:
    """Views of one flat parameter buffer (parameters(spec) in order) as named, shaped tensors."""
    out, off = {}, 0
    for name, shape in param_shapes(spec).items():
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[off:off + n].reshape(shape)
        off += n
    return out
