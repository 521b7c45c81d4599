"""The one canonical list of GPT-2 tensors.

PARAMS is in llm.c's checkpoint order. It drives the C struct and pointer table, the
checkpoint reader and writer, the random init, weight decay, and the NumPy reference.
ACTS is the activation list of the C program, in the order of its one activation buffer;
those with `grad` also have a gradient, in a second buffer of the same order.
Shapes are tuples of symbolic dimension names (see Spec.dims, plus B and T for activations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[str, ...]
    doc: str
    init: str = ""      # params only: "normal", "residual" (scaled by 1/sqrt(2L)), "ones", "zeros"
    decay: bool = False  # params only: AdamW weight decay applies (the 2-D weight matrices)
    grad: bool = True    # acts only: the C backward keeps a gradient buffer for it

    def sizes(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] for d in self.shape)

    def numel(self, dims: dict[str, int]) -> int:
        return math.prod(self.sizes(dims))  # exact: np.prod's int64 would wrap for absurd sizes

    def shape_comment(self) -> str:
        return "(" + ",".join(self.shape) + ")"


P = Tensor
PARAMS: tuple[Tensor, ...] = (
    P("wte", ("Vp", "C"), "token embedding; also the output classifier (tied)", "normal", True),
    P("wpe", ("maxT", "C"), "position embedding", "normal", True),
    P("ln1w", ("L", "C"), "layernorm 1 scale", "ones"),
    P("ln1b", ("L", "C"), "layernorm 1 shift", "zeros"),
    P("qkvw", ("L", "3C", "C"), "attention q,k,v projection weight", "normal", True),
    P("qkvb", ("L", "3C"), "attention q,k,v projection bias", "zeros"),
    P("attprojw", ("L", "C", "C"), "attention output projection weight", "residual", True),
    P("attprojb", ("L", "C"), "attention output projection bias", "zeros"),
    P("ln2w", ("L", "C"), "layernorm 2 scale", "ones"),
    P("ln2b", ("L", "C"), "layernorm 2 shift", "zeros"),
    P("fcw", ("L", "4C", "C"), "MLP up projection weight", "normal", True),
    P("fcb", ("L", "4C"), "MLP up projection bias", "zeros"),
    P("fcprojw", ("L", "C", "4C"), "MLP down projection weight", "residual", True),
    P("fcprojb", ("L", "C"), "MLP down projection bias", "zeros"),
    P("lnfw", ("C",), "final layernorm scale", "ones"),
    P("lnfb", ("C",), "final layernorm shift", "zeros"),
)

A = Tensor
ACTS: tuple[Tensor, ...] = (
    A("encoded", ("B", "T", "C"), "token + position embedding"),
    A("ln1", ("L", "B", "T", "C"), "layernorm 1 output"),
    A("ln1_mean", ("L", "B", "T"), "layernorm 1 mean", grad=False),
    A("ln1_rstd", ("L", "B", "T"), "layernorm 1 reciprocal standard deviation", grad=False),
    A("qkv", ("L", "B", "T", "3C"), "q, k, v for every position"),
    A("atty", ("L", "B", "T", "C"), "attention output, heads concatenated"),
    A("preatt", ("L", "B", "NH", "T", "T"), "attention scores before softmax"),
    A("att", ("L", "B", "NH", "T", "T"), "attention weights after softmax"),
    A("attproj", ("L", "B", "T", "C"), "attention output projection"),
    A("residual2", ("L", "B", "T", "C"), "residual stream after attention"),
    A("ln2", ("L", "B", "T", "C"), "layernorm 2 output"),
    A("ln2_mean", ("L", "B", "T"), "layernorm 2 mean", grad=False),
    A("ln2_rstd", ("L", "B", "T"), "layernorm 2 reciprocal standard deviation", grad=False),
    A("fch", ("L", "B", "T", "4C"), "MLP hidden pre-activation"),
    A("fch_gelu", ("L", "B", "T", "4C"), "MLP hidden after GELU"),
    A("fcproj", ("L", "B", "T", "C"), "MLP output projection"),
    A("residual3", ("L", "B", "T", "C"), "residual stream after the MLP"),
    A("lnf", ("B", "T", "C"), "final layernorm output"),
    A("lnf_mean", ("B", "T"), "final layernorm mean", grad=False),
    A("lnf_rstd", ("B", "T"), "final layernorm reciprocal standard deviation", grad=False),
    A("logits", ("B", "T", "Vp"), "classifier logits", grad=False),
    A("probs", ("B", "T", "Vp"), "softmax of the logits; the backward overwrites it with dlogits", grad=False),
    A("losses", ("B", "T"), "cross-entropy loss at each position", grad=False),
)


def param_sizes(dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    return {t.name: t.sizes(dims) for t in PARAMS}


def num_params(dims: dict[str, int]) -> int:
    return sum(t.numel(dims) for t in PARAMS)


def num_acts(dims: dict[str, int]) -> int:
    return sum(t.numel(dims) for t in ACTS)


def num_act_grads(dims: dict[str, int]) -> int:
    """Floats of the activation gradients the C backward keeps (ACTS with grad)."""
    return sum(t.numel(dims) for t in ACTS if t.grad)


def unflatten(flat: np.ndarray, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Views of one flat parameter buffer (PARAMS in order) as named, shaped tensors."""
    out, off = {}, 0
    for t in PARAMS:
        n = t.numel(dims)
        out[t.name] = flat[off:off + n].reshape(t.sizes(dims))
        off += n
    return out


# The CUDA trainer keeps the same activations with two changes: its flash attention never
# stores the T x T matrices (preatt, att) but recomputes them in the backward pass from q, k
# and one softmax statistic per query (att_lse), and its fused classifier turns the logits
# into their gradient in place (no probs). In bf16 the tensors are bf16 except these, which
# stay fp32 in both precisions:
CUDA_FP32_ACTS = frozenset({"ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd",
                            "att_lse", "losses"})


def _cuda_acts() -> tuple[Tensor, ...]:
    out = []
    for a in ACTS:
        if a.name in ("preatt", "att", "probs"):
            continue
        if a.name == "logits":
            a = Tensor("logits", a.shape, "classifier logits; after a forward with targets, their gradient")
        out.append(a)
        if a.name == "atty":
            out.append(Tensor("att_lse", ("L", "B", "NH", "T"),
                              "attention softmax statistic: log of the sum of exp(scores) per query"))
    return tuple(out)


CUDA_ACTS: tuple[Tensor, ...] = _cuda_acts()
