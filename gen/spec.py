"""The model spec: a GPT-2's sizes, parsed strictly from TOML and checked in one place.

A spec file is flat TOML:

    name = "gpt2-124m"
    layers = 12
    heads = 12
    channels = 768
    vocab_size = 50257
    padded_vocab_size = 50304   # optional: vocab_size rounded up to a multiple of 128
    max_seq_len = 1024

Everything derived from these (head size, parameter counts, FLOPs) is computed here or in
tensors.py (from the tensor list), in Python, never in the templates. from_dict checks every
spec, wherever it came from (a file, overrides, a checkpoint's header, a Hugging Face
config), in one place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import tensors
from .errors import LlmgenError

VOCAB_PAD_MULTIPLE = 128
CLASSIFIER_BLOCK_BYTES = 64 << 20  # the C trainer's block of logits: 256 rows of GPT-2's vocab

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
    name: str = dataclasses.field(compare=False)  # a label: equal specs have equal sizes
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    padded_vocab_size: int
    max_seq_len: int
    source: str = dataclasses.field(default="", compare=False)  # where it came from, for messages

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def dims(self) -> dict[str, int]:
        """Symbolic dimension names used by the tensor list, mapped to sizes."""
        C = self.n_embd
        return {"L": self.n_layer, "NH": self.n_head, "C": C, "3C": 3 * C, "4C": 4 * C,
                "V": self.vocab_size, "Vp": self.padded_vocab_size, "maxT": self.max_seq_len,
                "HS": self.head_size, "CR": self.classifier_rows}

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
        return "\n".join(lines) + "\n"

    def with_overrides(self, **overrides: int | None) -> "Spec":
        """A copy with some TOML keys replaced (None means keep); checked again."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        raw = {key: getattr(self, FIELDS[key][0]) for key in FIELDS}
        if "vocab_size" in changes and "padded_vocab_size" not in changes:
            raw.pop("padded_vocab_size")  # re-derive the padding for the new vocab
        raw.update(changes)
        suffix = ",".join(f"{k}={v}" for k, v in changes.items())
        raw["name"] = safe_name(f"{self.name}+{suffix}")
        return from_dict(raw, source=f"{self.source} with {suffix}")


def from_dict(raw: dict, source: str) -> Spec:
    """Build a Spec from TOML-like data, checking every key and invariant."""
    def fail(key: str | None, problem: str) -> SpecError:
        where = f"{source}: field '{key}'" if key else source
        return SpecError(f"{where}: {problem}")

    for key in raw:
        if key not in FIELDS:
            known = ", ".join(FIELDS)
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
    return Spec(name=name, n_layer=raw["layers"], n_head=raw["heads"], n_embd=raw["channels"],
                vocab_size=vocab, padded_vocab_size=vp, max_seq_len=raw["max_seq_len"], source=source)


def differences(a: Spec, b: Spec) -> str:
    """The sizes in which two specs differ, as 'layers 2 vs 3, heads 4 vs 6'; empty if none."""
    return ", ".join(f"{key} {getattr(a, FIELDS[key][0])} vs {getattr(b, FIELDS[key][0])}"
                     for key in INT_KEYS if getattr(a, FIELDS[key][0]) != getattr(b, FIELDS[key][0]))


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
