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

from .enums import Init, Target


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[str, ...]
    doc: str
    init: Init
    decay: bool = False          # AdamW's weight decay applies (the 2-D weight matrices)
    matmul: bool = False         # a matmul weight: 6 FLOPs per element per token (2 forward, 4 backward)
    hf: str = ""                 # Hugging Face name; "{n}" is the block index
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
_GPT2_PARAMS = (
    Param("wte", ("Vp", "C"), "token embedding; also the output classifier (tied)", Init.NORMAL,
          decay=True, matmul=True, hf="wte.weight"),
    Param("wpe", ("maxT", "C"), "position embedding", Init.NORMAL, decay=True, hf="wpe.weight"),
    Param("ln1w", ("L", "C"), "layernorm 1 scale", Init.ONES, hf="h.{n}.ln_1.weight"),
    Param("ln1b", ("L", "C"), "layernorm 1 shift", Init.ZEROS, hf="h.{n}.ln_1.bias"),
    Param("qkvw", ("L", "3C", "C"), "attention q,k,v projection weight", Init.NORMAL, decay=True, matmul=True,
          hf="h.{n}.attn.c_attn.weight", hf_transposed=True),
    Param("qkvb", ("L", "3C"), "attention q,k,v projection bias", Init.ZEROS, hf="h.{n}.attn.c_attn.bias"),
    Param("attprojw", ("L", "C", "C"), "attention output projection weight", Init.RESIDUAL, decay=True,
          matmul=True, hf="h.{n}.attn.c_proj.weight", hf_transposed=True),
    Param("attprojb", ("L", "C"), "attention output projection bias", Init.ZEROS, hf="h.{n}.attn.c_proj.bias"),
    Param("ln2w", ("L", "C"), "layernorm 2 scale", Init.ONES, hf="h.{n}.ln_2.weight"),
    Param("ln2b", ("L", "C"), "layernorm 2 shift", Init.ZEROS, hf="h.{n}.ln_2.bias"),
    Param("fcw", ("L", "4C", "C"), "MLP up projection weight", Init.NORMAL, decay=True, matmul=True,
          hf="h.{n}.mlp.c_fc.weight", hf_transposed=True),
    Param("fcb", ("L", "4C"), "MLP up projection bias", Init.ZEROS, hf="h.{n}.mlp.c_fc.bias"),
    Param("fcprojw", ("L", "C", "4C"), "MLP down projection weight", Init.RESIDUAL, decay=True, matmul=True,
          hf="h.{n}.mlp.c_proj.weight", hf_transposed=True),
    Param("fcprojb", ("L", "C"), "MLP down projection bias", Init.ZEROS, hf="h.{n}.mlp.c_proj.bias"),
    Param("lnfw", ("C",), "final layernorm scale", Init.ONES, hf="ln_f.weight"),
    Param("lnfb", ("C",), "final layernorm shift", Init.ZEROS, hf="ln_f.bias"),
)


def gpt2_parameters() -> tuple[Param, ...]:
    """GPT-2's parameter tensors (those of every spec with GPT-2's blocks), in checkpoint order."""
    return _GPT2_PARAMS


def parameters(spec) -> tuple[Param, ...]:
    """The parameter tensors of the spec's model, in checkpoint order."""
    return gpt2_parameters()


# ---- activations ----------------------------------------------------------------------
_C_ACTS = (
    Act("encoded", ("B", "T", "C"), "token + position embedding"),
    Act("ln1", ("L", "B", "T", "C"), "layernorm 1 output"),
    Act("ln1_mean", ("L", "B", "T"), "layernorm 1 mean", grad=False, fp32=True),
    Act("ln1_rstd", ("L", "B", "T"), "layernorm 1 reciprocal standard deviation", grad=False, fp32=True),
    Act("qkv", ("L", "B", "T", "3C"), "q, k, v for every position"),
    Act("atty", ("L", "B", "T", "C"), "attention output, heads concatenated"),
    Act("preatt", ("L", "B", "NH", "T", "T"), "attention scores before softmax"),
    Act("att", ("L", "B", "NH", "T", "T"), "attention weights after softmax"),
    Act("attproj", ("L", "B", "T", "C"), "attention output projection"),
    Act("residual2", ("L", "B", "T", "C"), "residual stream after attention"),
    Act("ln2", ("L", "B", "T", "C"), "layernorm 2 output"),
    Act("ln2_mean", ("L", "B", "T"), "layernorm 2 mean", grad=False, fp32=True),
    Act("ln2_rstd", ("L", "B", "T"), "layernorm 2 reciprocal standard deviation", grad=False, fp32=True),
    Act("fch", ("L", "B", "T", "4C"), "MLP hidden pre-activation"),
    Act("fch_gelu", ("L", "B", "T", "4C"), "MLP hidden after GELU"),
    Act("fcproj", ("L", "B", "T", "C"), "MLP output projection"),
    Act("residual3", ("L", "B", "T", "C"), "residual stream after the MLP"),
    Act("lnf", ("B", "T", "C"), "final layernorm output"),
    Act("lnf_mean", ("B", "T"), "final layernorm mean", grad=False, fp32=True),
    Act("lnf_rstd", ("B", "T"), "final layernorm reciprocal standard deviation", grad=False, fp32=True),
    Act("logits", ("CR", "Vp"), "classifier logits, CLASSIFIER_ROWS positions at a time; in the backward their "
        "gradient", grad=False),
    Act("losses", ("B", "T"), "cross-entropy loss at each position", grad=False, fp32=True),
)


def _cuda_acts(recompute_gelu: bool = False) -> tuple[Act, ...]:
    """The CUDA trainer keeps the C trainer's activations with these changes: its flash
    attention never stores the T x T matrices (preatt, att) but recomputes them in the
    backward pass from q, k and one softmax statistic per query (att_lse); the residual
    connections are fused into the projections before them, so attproj and fcproj (which
    the backward never reads) are not stored; it keeps the logits of every position, which
    its fused classifier turns into their gradient in place. With recompute_gelu, fch_gelu
    holds one layer (the one in use) instead of every layer: the backward recomputes it."""
    out = []
    for a in _C_ACTS:
        if a.name in ("preatt", "att", "attproj", "fcproj"):
            continue
        if a.name == "logits":
            a = Act("logits", ("B", "T", "Vp"), "classifier logits; after the classifier's backward, their gradient",
                    grad=False)
        if a.name == "fch_gelu" and recompute_gelu:
            a = Act("fch_gelu", ("B", "T", "4C"), "MLP hidden after GELU, of the layer in use (the backward "
                    "recomputes it)")
        out.append(a)
        if a.name == "atty":
            out.append(Act("att_lse", ("L", "B", "NH", "T"),
                           "attention softmax statistic: log of the sum of exp(scores) per query", fp32=True))
    return tuple(out)


_CUDA_ACTS = _cuda_acts()


def activations(spec, target: Target = Target.C) -> tuple[Act, ...]:
    """The activation tensors of the C or the CUDA trainer, in buffer order."""
    return _CUDA_ACTS if target is Target.CUDA else _C_ACTS


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
