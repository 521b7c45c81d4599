"""The choices llmgen offers, as enums: one definition each, shared by the spec, the emitter
and the command line (whose click choices are the enum values)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """An enum whose values are the strings a user types; str() gives the value."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]

    @classmethod
    def parse(cls, value: "str | Choice", what: str):
        """The member for a user's string, or an error listing the choices."""
        from .errors import LlmgenError
        try:
            return cls(value)
        except ValueError:
            raise LlmgenError(f"{what} '{value}': expected one of {', '.join(cls.values())}") from None


class Target(Choice):
    """Which trainer `emit` writes."""
    C = "c"          # train_gpt2.c, for the CPU
    CUDA = "cuda"    # train_gpt2.cu, for an NVIDIA GPU
    ALL = "all"      # both

    @property
    def c(self) -> bool:
        return self in (Target.C, Target.ALL)

    @property
    def cuda(self) -> bool:
        return self in (Target.CUDA, Target.ALL)


class Precision(Choice):
    """The CUDA trainer's parameters and activations."""
    FP32 = "fp32"
    BF16 = "bf16"


class Matmul(Choice):
    """The CUDA trainer's matmuls."""
    CUBLASLT = "cublaslt"   # cuBLASLt, with bias and GELU fused into its epilogue
    TILED = "tiled"         # a readable shared-memory tiled kernel


class Init(Choice):
    """How a parameter tensor starts (GPT-2's init)."""
    NORMAL = "normal"       # N(0, 0.02)
    RESIDUAL = "residual"   # N(0, 0.02 / sqrt(2 L)): the projections into the residual stream
    ONES = "ones"
    ZEROS = "zeros"


class Norm(Choice):
    """The normalisation before attention, before the MLP and at the top."""
    LAYERNORM = "layernorm"  # (x - mean) / std * weight (+ bias)
    RMSNORM = "rmsnorm"      # x / rms(x) * weight


class Position(Choice):
    """How a token's position enters."""
    LEARNED = "learned"      # a learned position embedding added to the token's (wpe)
    ROPE = "rope"            # rotary: q and k rotated by angles that grow with the position


class Mlp(Choice):
    """The MLP's activation."""
    GELU = "gelu"            # tanh approximation, as GPT-2
    SWIGLU = "swiglu"        # silu(gate) * up, two projections in (Llama)
    RELU2 = "relu2"          # relu(x)^2
