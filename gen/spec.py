"""The model spec: a GPT-2's sizes, parsed strictly from TOML and checked in one place.

A spec file is flat TOML:

    name = "gpt2-124m"
    layers = 12
    heads = 12
    channels = 768
    vocab_size = 50257
    padded_vocab_size = 50304   # optional: vocab_size rounded up to a multiple of 128
    max_seq_len = 1024

Everything derived from these (head size, parameter counts, memory, FLOPs) is computed
here, in Python, never in the templates.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import LlmgenError

VOCAB_PAD_MULTIPLE = 128

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


class SpecError(LlmgenError):
    """A spec that cannot be used; the message names the file and the field."""


def padded(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    return (vocab_size + multiple - 1) // multiple * multiple


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
                "HS": self.head_size}

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
        raw["name"] = f"{self.name}+{suffix}"
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
            raise fail(key, f"must be an integer, got {value!r} ({type(value).__name__})")
        if value <= 0:
            raise fail(key, f"must be positive, got {value}")
    name = raw.get("name", Path(source).stem if source else "custom")
    if not isinstance(name, str) or not name:
        raise fail("name", f"must be a non-empty string, got {name!r}")

    vocab = raw["vocab_size"]
    vp = raw.get("padded_vocab_size", padded(vocab))
    if vp < vocab:
        raise fail("padded_vocab_size", f"{vp} is smaller than vocab_size {vocab}")
    if raw["channels"] % raw["heads"]:
        raise fail("channels", f"{raw['channels']} is not divisible by heads {raw['heads']}")
    if vp > 65536:
        raise fail("padded_vocab_size", f"{vp} is too large: tokens are stored as uint16 (at most 65536)")
    return Spec(name=name, n_layer=raw["layers"], n_head=raw["heads"], n_embd=raw["channels"],
                vocab_size=vocab, padded_vocab_size=vp, max_seq_len=raw["max_seq_len"], source=source)


def differences(a: Spec, b: Spec) -> str:
    """The sizes in which two specs differ, as 'layers 2 vs 3, heads 4 vs 6'; empty if none."""
    return ", ".join(f"{key} {getattr(a, FIELDS[key][0])} vs {getattr(b, FIELDS[key][0])}"
                     for key in INT_KEYS if getattr(a, FIELDS[key][0]) != getattr(b, FIELDS[key][0]))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("llmgen.presets").iterdir()
                  if p.name.endswith(".toml"))


def load(name_or_path: str) -> Spec:
    """A preset name (see preset_names()) or a path to a TOML file."""
    path = Path(name_or_path)
    if name_or_path in preset_names():
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
