"""The model spec: a transformer's sizes and blocks, parsed strictly from TOML and checked in
one place.

A spec file is flat TOML: the sizes, and optionally the blocks (the defaults are GPT-2's):

    name = "gpt2-124m"
    layers = 12
    heads = 12
    channels = 768
    vocab_size = 50257
    padded_vocab_size = 50304   # optional: vocab_size rounded up to a multiple of 128
    max_seq_len = 1024
    norm = "layernorm"          # or "rmsnorm"
    norm_eps = 1e-5
    position = "learned"        # wpe, or "rope" (rotary, with rope_theta = 10000.0)
    mlp = "gelu"                # or "swiglu", "relu2"; mlp_hidden = 4 * channels
    kv_heads = 12               # heads (grouped-query attention when fewer; 1: multi-query)
    bias = true                 # biases in every linear layer and layernorm
    tie_embeddings = true       # the classifier is wte

Everything derived from these (head size, parameter counts, FLOPs) is computed here or in
tensors.py (from the tensor list), in Python, never in the templates. from_dict checks every
spec, wherever it came from (a file, overrides, a checkpoint's header, a Hugging Face
config), in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import tomllib
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path

from . import tensors
from .enums import Mlp, Norm, Position
from .errors import LlmgenError

VOCAB_PAD_MULTIPLE = 128
CLASSIFIER_BLOCK_BYTES = 128 << 20  # the C trainer's block of logits: 640 rows of GPT-2's vocab

# TOML key -> (dataclass field, description); the order is the order of a spec file.
FIELDS = {
    "name": ("name", "model name"),
    "layers": ("n_layer", "number of transformer blocks"),
    "heads": ("n_head", "attention heads per block"),
    "channels": ("n_embd", "embedding channels"),
    "vocab_size": ("vocab_size", "vocabulary size"),
    "padded_vocab_size": ("padded_vocab_size", "vocabulary size padded for speed"),
    "max_seq_len": ("max_seq_len", "longest sequence (context length)"),
}
REQUIRED = ("layers", "heads", "channels", "vocab_size", "max_seq_len")
INT_KEYS = tuple(k for k in FIELDS if k != "name")
# The blocks: TOML key -> (dataclass field, kind, description). A kind is an enum (its values
# are the strings a file gives), int, float or bool. A spec that leaves them out is GPT-2.
ARCH_FIELDS = {
    "norm": ("norm", Norm, "layernorm or rmsnorm"),
    "norm_eps": ("norm_eps", float, "the norms' epsilon"),
    "position": ("position", Position, "learned (wpe) or rope"),
    "rope_theta": ("rope_theta", float, "rotary base (with rope)"),
    "mlp": ("mlp", Mlp, "gelu, swiglu or relu2"),
    "mlp_hidden": ("mlp_hidden", int, "MLP hidden channels (default 4 * channels)"),
    "kv_heads": ("kv_heads", int, "key and value heads (grouped-query attention; default heads)"),
    "bias": ("bias", bool, "biases in every linear layer and layernorm"),
    "tie_embeddings": ("tie_embeddings", bool, "the classifier is wte"),
}
DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA = 1e-5, 10000.0

# The C trainer does its size arithmetic in 32-bit ints: every size, and the element count of
# every weight matrix (the largest: the embeddings Vp x C and maxT x C, the MLP's 4C x C),
# must be at most INT32_MAX.
INT32_MAX = 2**31 - 1
# A name becomes part of file paths (build/NAME) and of the emitted C (comments, a string):
# letters, digits and . _ - + = , (the overrides' "+layers=3,heads=4"), starting with a
# letter, a digit or _ (so never "." or ".."), at most NAME_MAX characters.
NAME_MAX = 64
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=,-]*")
NAME_RULE = (f"1 to {NAME_MAX} of the characters A-Z a-z 0-9 . _ - + = , "
             "starting with a letter, a digit or _")


class SpecError(LlmgenError):
    """A spec that cannot be used; the message names the file and the field."""


def padded(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return (vocab_size + multiple - 1) // multiple * multiple


def valid_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= NAME_MAX and NAME_RE.fullmatch(name) is not None


def safe_name(text: str) -> str:
    """A valid name made from any text (a file's stem, a name plus overrides): other characters
    become _, a leading . - + = or , is dropped, and a name too long is cut and ends in a hash of
    the whole, so that different long texts keep different names."""
    name = re.sub(r"[^A-Za-z0-9._+=,-]", "_", text).lstrip(".-+=,") or "model"
    if len(name) > NAME_MAX:
        name = name[:NAME_MAX - 9] + "-" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:8]
    return name


def _show(value: object, limit: int = 40) -> str:
    """repr of a value from a file, cut short for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Spec:
    name: str = dataclasses.field(compare=False)  # a label: equal specs have equal sizes and blocks
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    padded_vocab_size: int
    max_seq_len: int
    source: str = dataclasses.field(default="", compare=False)  # where it came from, for messages
    norm: Norm = Norm.LAYERNORM
    norm_eps: float = DEFAULT_NORM_EPS
    position: Position = Position.LEARNED
    rope_theta: float = DEFAULT_ROPE_THETA
    mlp: Mlp = Mlp.GELU
    mlp_hidden: int = 0        # 0: 4 * channels (see mlp_channels)
    kv_heads: int = 0          # 0: heads (see kv_head_count)
    bias: bool = True
    tie_embeddings: bool = True

    # ---- the blocks ----------------------------------------------------------------------
    @property
    def is_gpt2(self) -> bool:
        """GPT-2's blocks (whatever the sizes): what llm.c's files and GPT2LMHeadModel hold."""
        return self.arch() == {}

    def arch(self) -> dict:
        """The block keys that differ from GPT-2's, by TOML key (empty for GPT-2)."""
        out = {}
        for key, (field, _, _) in ARCH_FIELDS.items():
            value = getattr(self, field)
            default = {"mlp_hidden": 4 * self.n_embd, "kv_heads": self.n_head}.get(key, Spec.__dataclass_fields__[field].default)
            if key in ("mlp_hidden", "kv_heads"):
                value = self.mlp_channels if key == "mlp_hidden" else self.kv_head_count
            if key == "rope_theta" and self.position is not Position.ROPE:
                continue
            if value != default:
                out[key] = value
        return out

    @property
    def mlp_channels(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def kv_head_count(self) -> int:
        return self.kv_heads or self.n_head

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def dims(self) -> dict[str, int]:
        """Symbolic dimension names used by the tensor list, mapped to sizes."""
        C, H, KV = self.n_embd, self.mlp_channels, self.kv_head_count * self.head_size
        return {"L": self.n_layer, "NH": self.n_head, "C": C, "3C": 3 * C, "4C": 4 * C,
                "V": self.vocab_size, "Vp": self.padded_vocab_size, "maxT": self.max_seq_len,
                "HS": self.head_size, "CR": self.classifier_rows,
                "KVH": self.kv_head_count, "QKV": C + 2 * KV, "H": H, "2H": 2 * H, "8C": 8 * C}

    @property
    def classifier_rows(self) -> int:
        """Positions the C trainer's classifier takes at a time: its block of logits (rows x Vp
        floats) stays within CLASSIFIER_BLOCK_BYTES, and the rows are a multiple of 64, at
        least 64, at most 4096."""
        rows = CLASSIFIER_BLOCK_BYTES // (4 * self.padded_vocab_size) // 64 * 64
        return max(64, min(4096, rows))

    def to_toml(self) -> str:
        lines = [f'name = "{self.name}"']
        for key in INT_KEYS:
            lines.append(f"{key} = {getattr(self, FIELDS[key][0])}")
        for key, value in self.arch().items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def raw(self) -> dict:
        """The spec as TOML-like data (from_dict gives it back)."""
        raw = {key: getattr(self, FIELDS[key][0]) for key in FIELDS}
        raw.update({k: v.value if isinstance(v, Enum) else v for k, v in self.arch().items()})
        return raw

    def with_overrides(self, **overrides) -> "Spec":
        """A copy with some TOML keys replaced (None means keep); checked again."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        raw = self.raw()
        if "vocab_size" in changes and "padded_vocab_size" not in changes:
            raw.pop("padded_vocab_size")  # re-derive the padding for the new vocab
        if "channels" in changes and "mlp_hidden" not in changes and "mlp_hidden" not in self.arch():
            raw.pop("mlp_hidden", None)   # 4 * the new channels
        if "heads" in changes and "kv_heads" not in changes and "kv_heads" not in self.arch():
            raw.pop("kv_heads", None)
        if changes.get("position") == Position.LEARNED.value and "rope_theta" not in changes:
            raw.pop("rope_theta", None)
        raw.update(changes)
        suffix = ",".join(f"{k}={v.value if isinstance(v, Enum) else v}" for k, v in changes.items())
        raw["name"] = safe_name(f"{self.name}+{suffix}")
        return from_dict(raw, source=f"{self.source} with {suffix}")


def _toml_value(value) -> str:
    if isinstance(value, Enum):
        return f'"{value.value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def from_dict(raw: dict, source: str) -> Spec:
    """Build a Spec from TOML-like data, checking every key and invariant."""
    def fail(key: str | None, problem: str) -> SpecError:
        where = f"{source}: field '{key}'" if key else source
        return SpecError(f"{where}: {problem}")

    for key in raw:
        if key not in FIELDS and key not in ARCH_FIELDS:
            known = ", ".join([*FIELDS, *ARCH_FIELDS])
            raise fail(key, f"unknown key (known keys: {known})")
    for key in REQUIRED:
        if key not in raw:
            raise fail(key, "missing (required: " + ", ".join(REQUIRED) + ")")
    for key in INT_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(key, f"must be an integer, got {_show(value)} ({type(value).__name__})")
        if value <= 0:
            raise fail(key, f"must be positive, got {_show(value)}")
        if value > INT32_MAX:
            raise fail(key, f"{_show(value)} is too large: sizes are 32-bit ints in the trainer "
                            f"(at most 2**31 - 1 = {INT32_MAX:,})")
    name = raw.get("name", safe_name(Path(source).stem) if source else "custom")
    if not isinstance(name, str) or not name:
        raise fail("name", f"must be a non-empty string, got {_show(name)}")
    if not valid_name(name):
        raise fail("name", f"{_show(name)} is not a plain name: it must be {NAME_RULE}")

    vocab = raw["vocab_size"]
    vp = raw.get("padded_vocab_size", padded(vocab))
    if vp < vocab:
        raise fail("padded_vocab_size", f"{vp} is smaller than vocab_size {vocab}")
    if raw["channels"] % raw["heads"]:
        raise fail("channels", f"{raw['channels']} is not divisible by heads {raw['heads']}")
    if vp > 65536:
        raise fail("padded_vocab_size", f"{vp} is too large: tokens are stored as uint16 (at most 65536)")
    C = raw["channels"]
    for key, matrix, elements in (("channels", "4 * channels * channels", 4 * C * C),
                                  ("max_seq_len", "max_seq_len * channels", raw["max_seq_len"] * C),
                                  ("padded_vocab_size", "padded_vocab_size * channels", vp * C)):
        if elements > INT32_MAX:
            raise fail(key, f"too large: {matrix} = {elements:,} elements exceeds 2**31 - 1 = {INT32_MAX:,}, "
                            "the limit of the trainer's 32-bit int size arithmetic")
    arch = _arch(raw, fail)
    return Spec(name=name, n_layer=raw["layers"], n_head=raw["heads"], n_embd=raw["channels"],
                vocab_size=vocab, padded_vocab_size=vp, max_seq_len=raw["max_seq_len"], source=source, **arch)


def _arch(raw: dict, fail) -> dict:
    """The block keys of raw, checked: their types, ranges, and the combinations that do not
    fit (rope_theta without rope, kv_heads not dividing heads, an odd head size with rope)."""
    arch = {}
    for key, (field, kind, what) in ARCH_FIELDS.items():
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(kind, type) and issubclass(kind, Enum):
            if not isinstance(value, str) or value not in kind.values():
                raise fail(key, f"must be one of {', '.join(repr(v) for v in kind.values())}, got {_show(value)}")
            value = kind(value)
        elif kind is bool:
            if not isinstance(value, bool):
                raise fail(key, f"must be true or false, got {_show(value)}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(key, f"must be an integer, got {_show(value)} ({type(value).__name__})")
            if not 0 < value <= INT32_MAX:
                raise fail(key, f"must be positive and at most 2**31 - 1, got {_show(value)}")
        else:  # float
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail(key, f"must be a number, got {_show(value)} ({type(value).__name__})")
            value = float(value)
            if not (value > 0 and math.isfinite(value)):
                raise fail(key, f"must be a positive finite number, got {_show(value)}")
        arch[field] = value
    C, NH = raw["channels"], raw["heads"]
    if "rope_theta" in arch and arch.get("position", Position.LEARNED) is not Position.ROPE:
        raise fail("rope_theta", "is given, but position is not \"rope\" (the rotary base applies only to rope)")
    if arch.get("position") is Position.ROPE and (C // NH) % 2:
        raise fail("position", f"rope needs an even head size, and channels / heads = {C}/{NH} = {C // NH} is odd")
    kv = arch.get("kv_heads", NH)
    if NH % kv:
        raise fail("kv_heads", f"{kv} does not divide heads {NH} (each key/value head serves a group of query heads)")
    H = arch.get("mlp_hidden", 4 * C)
    rows = 2 * H if arch.get("mlp") is Mlp.SWIGLU else H
    if rows * C > INT32_MAX:
        raise fail("mlp_hidden", f"too large: {rows} x channels = {rows * C:,} elements exceeds 2**31 - 1")
    if arch.get("mlp_hidden") == 4 * C:
        del arch["mlp_hidden"]  # the default: spelled or not, the same spec
    if arch.get("kv_heads") == NH:
        del arch["kv_heads"]
    return arch


def describe_blocks(spec: Spec) -> str:
    """The blocks in words: "GPT-2's (layernorm, learned positions, gelu, biases, tied)", or
    e.g. "rmsnorm, rope (theta 10000), swiglu (hidden 2048), 4 kv heads, no biases, untied"."""
    if spec.is_gpt2:
        return "GPT-2's (layernorm, learned positions, gelu, biases, tied classifier)"
    parts = [spec.norm.value + (f" (eps {spec.norm_eps:g})" if spec.norm_eps != DEFAULT_NORM_EPS else ""),
             "learned positions" if spec.position is Position.LEARNED else f"rope (theta {spec.rope_theta:g})",
             spec.mlp.value + (f" (hidden {spec.mlp_channels})" if spec.mlp_channels != 4 * spec.n_embd else ""),
             f"{spec.kv_head_count} kv heads" if spec.kv_head_count != spec.n_head else "multi-head",
             "biases" if spec.bias else "no biases", "tied classifier" if spec.tie_embeddings else "untied classifier"]
    return ", ".join(parts)


def differences(a: Spec, b: Spec) -> str:
    """The sizes and blocks in which two specs differ, as 'layers 2 vs 3, norm layernorm vs
    rmsnorm'; empty if none."""
    ra, rb = a.raw(), b.raw()
    keys = [k for k in [*INT_KEYS, *ARCH_FIELDS] if k in ra or k in rb]
    default = {key: Spec.__dataclass_fields__[field].default for key, (field, _, _) in ARCH_FIELDS.items()}
    default.update(mlp_hidden="4*channels", kv_heads="heads")

    def value(r, k):
        v = r.get(k, default[k] if k in default else None)
        return v.value if isinstance(v, Enum) else v
    return ", ".join(f"{k} {value(ra, k)} vs {value(rb, k)}" for k in keys if value(ra, k) != value(rb, k))


TEST_PRESET_PREFIX = "test-"  # presets for the test suite, kept out of the command line's help


def preset_names(tests: bool = True) -> list[str]:
    """The preset specs, smallest model first; the test presets (named test-...) last, or
    left out with tests=False."""
    names = [p.name[:-5] for p in resources.files("llmgen.presets").iterdir() if p.name.endswith(".toml")]
    by_size = sorted(names, key=lambda n: (n.startswith(TEST_PRESET_PREFIX), tensors.num_params(load(n)), n))
    return [n for n in by_size if tests or not n.startswith(TEST_PRESET_PREFIX)]


def load(name_or_path: str) -> Spec:
    """A preset name (see preset_names()) or a path to a TOML file."""
    path = Path(name_or_path)
    if resources.files("llmgen.presets").joinpath(name_or_path + ".toml").is_file() and "/" not in name_or_path:
        text = resources.files("llmgen.presets").joinpath(name_or_path + ".toml").read_text()
        source = f"preset {name_or_path}"
    elif path.suffix == ".toml" or path.exists() or "/" in name_or_path:
        from .fileio import read_regular  # (fileio imports this module)
        source = str(path)
        try:
            text = read_regular(path, "spec file").decode("utf-8")
        except LlmgenError as e:
            raise SpecError(str(e)) from None
        except UnicodeDecodeError as e:
            raise SpecError(f"{path}: cannot read spec file ({e})") from None
    else:
        raise SpecError(f"'{name_or_path}' is neither a preset ({', '.join(preset_names())}) "
                        "nor a spec file")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML ({e})") from None
    return from_dict(raw, source)


def flops_per_token(spec: Spec, T: int) -> dict[str, int]:
    """Training FLOPs per token (forward and backward) at sequence length T, counted the
    usual way for MFU: the matmuls and the attention; elementwise work (layernorm, GELU,
    softmax, residuals, AdamW) is not counted.

    matmul: a weight matrix used as x @ W^T costs 2 FLOPs (a multiply and an add) per weight
      per token forward, and 4 backward (dinp and dweight): 6 per weight per token, over the
      tensors marked `matmul` in the tensor list. For GPT-2 those are, per layer, qkvw 3C*C +
      attprojw C*C + fcw 4C*C + fcprojw 4C*C = 12 C^2, and the tied classifier wte, Vp*C (the
      trainer computes the padded rows too):  matmul = 6 * (L * 12 C^2 + Vp * C)
    attention: causal, so position t scores t + 1 keys; q.k and att @ v each cost 2*C*(t+1)
      FLOPs per layer forward. Averaged over t = 0..T-1 that is 2*C*(T+1) per token, and
      backward twice that:  attention = 6 * L * C * (T + 1)
    """
    dims = spec.dims
    matmul = 6 * sum(tensors.numel(p.shape, dims) for p in tensors.parameters(spec) if p.matmul)
    attention = 6 * spec.n_layer * spec.n_embd * (T + 1)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}
