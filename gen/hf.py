"""Hugging Face GPT-2 weights in and out: transformers' GPT2LMHeadModel layout in a
model.safetensors file (with its config.json) to an llm.c model checkpoint, and back.

The two layouts hold the same numbers:

    Hugging Face (transformers)                    llm.c (tensors.parameters: each names its HF tensor)
    [transformer.]wte.weight          (V,C)        wte       (Vp,C)   rows V..Vp are padding
    [transformer.]wpe.weight          (maxT,C)     wpe       (maxT,C)
    [transformer.]h.N.ln_1.weight     (C)          ln1w[N]   (C)
    [transformer.]h.N.attn.c_attn.weight (C,3C)    qkvw[N]   (3C,C)   transposed
    [transformer.]h.N.attn.c_proj.weight (C,C)     attprojw[N] (C,C)  transposed
    [transformer.]h.N.mlp.c_fc.weight    (C,4C)    fcw[N]    (4C,C)   transposed
    [transformer.]h.N.mlp.c_proj.weight  (4C,C)    fcprojw[N] (C,4C)  transposed
    ... the biases and layernorms, [transformer.]ln_f.weight/bias -> lnfw, lnfb

Hugging Face's GPT-2 linear layers are Conv1D modules that store their weight as (in, out)
and compute x @ W + b; llm.c stores (out, in) and computes x @ W.T + b, hence the transposes.
The causal-mask buffers h.N.attn.bias and h.N.attn.masked_bias that older files carry are
skipped. lm_head.weight, when present, must equal wte (GPT-2 ties them); it is not written.

safetensors is read and written here, without the safetensors package: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, optional
__metadata__}, then the raw little-endian tensor data.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from pathlib import Path

import numpy as np

from .errors import LlmgenError
from .fileio import check_memory, from_bf16, open_regular, read_regular, write_atomic
from .spec import Spec, from_dict, padded, safe_name
from .tensors import gpt2_parameters, num_params, param_shapes, parameters

MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype -> (numpy dtype of the stored data, bytes per value)
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}

PREFIX = "transformer."
SKIPPED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers, not weights
BLOCK = re.compile(r"^h\.(\d+)\.")
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# GELU variants that compute llm.c's tanh approximation
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# config.json key for a padded vocab other than the multiple of 128 (transformers ignores it)
PADDING_KEY = "llmgen_padded_vocab_size"
# the config.json keys read here: (check of the value, what it must be)
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
CONFIG_TYPES = {
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "architectures": (lambda v: v is None or isinstance(v, list) and all(isinstance(a, str) for a in v),
                      "a list of strings"),
    "activation_function": (lambda v: isinstance(v, str), "a string"),
    "layer_norm_epsilon": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "scale_attn_weights": _BOOL, "scale_attn_by_inverse_layer_idx": _BOOL, "add_cross_attention": _BOOL,
    "vocab_size": _INT, "n_embd": _INT, "n_positions": _INT, "n_layer": _INT, "n_head": _INT,
    "n_inner": (lambda v: v is None or _INT[0](v), "an integer or null"),
    PADDING_KEY: _INT,
}


# ---- safetensors -------------------------------------------------------------------------
class SafeTensors:
    """A safetensors file, its header checked on opening; tensors are read on demand."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        with open_regular(path, "safetensors file") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
            except OSError as e:
                raise LlmgenError(f"{path}: cannot read ({e.strerror})") from None
        size = len(self._map)
        if size < 8:
            raise LlmgenError(f"{path}: truncated safetensors file ({size} bytes, shorter than its 8-byte header length)")
        n = int.from_bytes(self._map[:8], "little")
        if n > MAX_HEADER_BYTES:
            raise LlmgenError(f"{path}: not a safetensors file (header length {n} is implausible)")
        if 8 + n > size:
            raise LlmgenError(f"{path}: truncated safetensors file (its header needs {8 + n} bytes, the file has {size})")
        try:
            header = json.loads(bytes(self._map[8:8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise LlmgenError(f"{path}: not a safetensors file (its header is not JSON: "
                              f"{'nested too deeply' if isinstance(e, RecursionError) else e})") from None
        if not isinstance(header, dict):
            raise LlmgenError(f"{path}: not a safetensors file (its header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None)
        if self.metadata is not None and not (isinstance(self.metadata, dict) and all(
                isinstance(v, str) for v in self.metadata.values())):
            raise LlmgenError(f"{path}: __metadata__ must be an object of strings, got {_brief(self.metadata)}")
        self._start = 8 + n
        data_size = size - self._start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self.entries[name] = _header_entry(path, name, entry, data_size)
        # each tensor its own bytes: sorted by where they start, none begins before the last ends
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self.entries.items() if end > begin)
        for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
            if begin1 < end0:
                raise LlmgenError(f"{path}: tensors {name0} and {name1}: data_offsets overlap "
                                  f"(bytes {begin1} to {end0} of the data belong to both)")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (float16 and bfloat16 are widened exactly)."""
        dtype, shape, begin, end = self.entries[name]
        if dtype not in DTYPES:
            raise LlmgenError(f"{self.path}: tensor {name} has dtype {dtype}, expected one of {', '.join(DTYPES)}")
        raw = np.frombuffer(self._map, dtype=DTYPES[dtype][0], count=(end - begin) // DTYPES[dtype][1],
                            offset=self._start + begin)
        values = from_bf16(raw) if dtype == "BF16" else raw.astype(np.float32)
        return values.reshape(shape)


def _brief(value: object, limit: int = 40) -> str:
    """repr of a value read from a file, cut short for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header_entry(path: Path, name: str, entry: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor of a safetensors header, every field checked."""
    if not name.isprintable():
        raise LlmgenError(f"{path}: tensor name {_brief(name)} has control characters")
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise LlmgenError(f"{where}: header entry must be an object with dtype, shape and data_offsets, "
                          f"got {_brief(entry)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise LlmgenError(f"{where}: {key} missing from its header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise LlmgenError(f"{where}: dtype must be a string, got {_brief(dtype)}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise LlmgenError(f"{where}: shape must be a list of non-negative integers, got {_brief(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise LlmgenError(f"{where}: data_offsets must be two integers [begin, end] with 0 <= begin <= end, "
                          f"got {_brief(offsets)}")
    begin, end = offsets
    if end > data_size:
        raise LlmgenError(f"{path}: truncated safetensors file (tensor {name} ends at byte {end} "
                          f"of the data, the file holds {data_size})")
    # exact integers: np.prod in int64 would wrap (or fail) for crafted shapes
    if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype][1]:
        raise LlmgenError(f"{where}: {end - begin} bytes do not hold a {dtype} tensor of shape {_brief(shape)}")
    return dtype, tuple(shape), begin, end


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """float32 tensors in the given order, written atomically."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    arrays, offset = [], 0
    for name, a in tensors.items():
        a = np.asarray(a, dtype="<f4")
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    write_atomic(path, [len(text).to_bytes(8, "little"), text, *(a.reshape(-1).data for a in arrays)])


# ---- import ------------------------------------------------------------------------------
def _find_files(source: Path) -> tuple[Path, Path | None]:
    """model.safetensors and its config.json (None when absent) for a dir or a file."""
    if source.is_dir():
        model = source / "model.safetensors"
        if not model.exists():
            other = [p.name for p in source.glob("*.safetensors*")] + [p.name for p in source.glob("pytorch_model*.bin")]
            hint = f" (found {', '.join(sorted(other))}; only one model.safetensors file is read)" if other else ""
            raise LlmgenError(f"{source}: no model.safetensors in this dir{hint}")
    elif source.exists():
        model = source
    else:
        raise LlmgenError(f"{source}: no such file or dir")
    config = model.parent / "config.json"
    return model, config if config.exists() else None


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(read_regular(path, "model config").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmgenError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise LlmgenError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise LlmgenError(f"{path}: not a model config (a JSON object)")
    for key, (is_valid, expected) in CONFIG_TYPES.items():
        if key in config and not is_valid(config[key]):
            raise LlmgenError(f"{path}: {key} must be {expected}, got {_brief(config[key])} "
                              f"({type(config[key]).__name__})")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type != "gpt2" or any(a not in ARCHITECTURES for a in archs):
        raise LlmgenError(f"{path}: model_type {model_type!r} with architectures {archs} is not GPT-2 "
                          f"(expected model_type 'gpt2', architectures among {', '.join(ARCHITECTURES)})")
    act = config.get("activation_function", "gelu_new")
    problems = []
    if act not in TANH_GELUS:
        problems.append(f"activation_function {act!r} (llm.c computes the tanh GELU: {', '.join(TANH_GELUS)})")
    if config.get("layer_norm_epsilon", 1e-5) != 1e-5:
        problems.append(f"layer_norm_epsilon {config['layer_norm_epsilon']} (llm.c uses 1e-5)")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false (llm.c scales by 1/sqrt(head size))")
    if config.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx true")
    if config.get("add_cross_attention", False):
        problems.append("add_cross_attention true")
    if problems:
        raise LlmgenError(f"{path}: a GPT-2 variant llm.c does not compute: {'; '.join(problems)}")
    return config


def import_hf(source: str | Path, heads: int | None = None, padded_vocab_size: int | None = None,
              name: str = "hf") -> tuple[Spec, dict[str, np.ndarray], list[str]]:
    """Read a Hugging Face GPT-2; returns (spec, params in llm.c's layout, notes to print).

    The vocab is padded to padded_vocab_size if given, else to the value an llmgen export
    recorded in config.json (PADDING_KEY), else to a multiple of 128."""
    model_path, config_path = _find_files(Path(source))
    st = SafeTensors(model_path)
    config = _read_config(config_path) if config_path else None
    notes = [f"read {model_path}" + (f" and {config_path}" if config_path else " (no config.json)")]

    # the names without the optional "transformer." prefix
    names: dict[str, str] = {}
    for full in st.entries:
        short = full.removeprefix(PREFIX)
        if short in names:
            raise LlmgenError(f"{model_path}: tensor {short} is there twice, as {names[short]} and {full}")
        names[short] = full
    layers = sorted({int(m.group(1)) for n in names if (m := BLOCK.match(n))})
    L = layers[-1] + 1 if layers else 0
    templates = {p.hf[0] for p in gpt2_parameters()}
    for short, full in names.items():
        known = short == "lm_head.weight" or SKIPPED.fullmatch(short) or BLOCK.sub("h.{n}.", short, 1) in templates
        if not known:
            raise LlmgenError(f"{model_path}: unexpected tensor {full} (not part of GPT-2's layout)")

    def tensor(short: str) -> str:
        if short not in names:
            raise LlmgenError(f"{model_path}: missing tensor {short} (or {PREFIX}{short})")
        return names[short]

    # the sizes, from the tensors' shapes, checked against config.json
    wte_shape, wpe_shape = st.shape(tensor("wte.weight")), st.shape(tensor("wpe.weight"))
    if len(wte_shape) != 2 or len(wpe_shape) != 2 or wte_shape[1] != wpe_shape[1]:
        raise LlmgenError(f"{model_path}: unexpected shapes {list(wte_shape)} of wte.weight and "
                          f"{list(wpe_shape)} of wpe.weight (expected (vocab, C) and (positions, C))")
    V, C = wte_shape
    maxT = wpe_shape[0]
    if L == 0:
        raise LlmgenError(f"{model_path}: missing tensor h.0.ln_1.weight (no transformer blocks)")
    if config:
        for key, have in (("vocab_size", V), ("n_embd", C), ("n_positions", maxT), ("n_layer", L)):
            if key in config and config[key] != have:
                raise LlmgenError(f"{config_path}: {key} is {config[key]}, but the tensors in {model_path} "
                                  f"have {have}")
        if config.get("n_inner") not in (None, 4 * C):
            raise LlmgenError(f"{config_path}: n_inner {config['n_inner']} is not 4 * n_embd = {4 * C}")
        if heads is not None and config.get("n_head", heads) != heads:
            raise LlmgenError(f"--heads {heads} differs from n_head {config['n_head']} in {config_path}")
        heads = config.get("n_head", heads)
    if heads is None:
        if C % 64:
            raise LlmgenError(f"{model_path}: no config.json to give the number of heads, and {C} channels "
                              "are not a multiple of GPT-2's head size 64: pass --heads")
        heads = C // 64
        notes.append(f"no config.json: assuming GPT-2's head size 64, so {heads} heads (--heads sets them)")
    if padded_vocab_size is None:
        padded_vocab_size = config.get(PADDING_KEY, padded(V)) if config else padded(V)
    raw = {"name": safe_name(name), "layers": L, "heads": heads, "channels": C, "vocab_size": V,
           "padded_vocab_size": padded_vocab_size, "max_seq_len": maxT}
    spec = from_dict(raw, str(config_path or model_path))

    # the tensors, transposed and stacked into llm.c's layout
    sizes = param_shapes(spec)
    plan = []  # every tensor is there with its shape before anything is allocated
    for t in parameters(spec):
        hf, ours, transposed = t.hf[0], t.name, t.hf_transposed
        per_layer = "{n}" in hf
        want = sizes[ours][1:] if per_layer else sizes[ours]
        if ours == "wte":
            want = (V, C)
        want_hf = want[::-1] if transposed else want
        for n in range(L) if per_layer else [None]:
            full = tensor(hf.format(n=n))
            if st.shape(full) != want_hf:
                raise LlmgenError(f"{model_path}: tensor {full} has shape {list(st.shape(full))}, "
                                  f"expected {list(want_hf)}")
            plan.append((full, ours, transposed, per_layer, n))
    n_params = num_params(spec)
    check_memory(model_path, 4 * n_params, f"the model's {n_params:,} parameters")
    try:
        params = {name: np.zeros(shape, dtype=np.float32) for name, shape in sizes.items()}
    except MemoryError:
        raise LlmgenError(f"{model_path}: not enough memory for the model's {n_params:,} parameters") from None
    for full, ours, transposed, per_layer, n in plan:
        a = st.get(full)
        a = a.T if transposed else a
        if ours == "wte":
            params["wte"][:V] = a  # the padded rows stay zero
        elif per_layer:
            params[ours][n] = a
        else:
            params[ours][...] = a
    if "lm_head.weight" in names:
        head = names["lm_head.weight"]
        if st.shape(head) != (V, C) or not np.array_equal(st.get(head), params["wte"][:V]):
            raise LlmgenError(f"{model_path}: {head} differs from wte.weight: an untied output layer "
                              "is not supported (GPT-2 and llm.c tie them)")
    return spec, params, notes


# ---- export ------------------------------------------------------------------------------
def hf_tensors(spec: Spec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's state dict (without the tied lm_head.weight), padded vocab rows dropped."""
    out = {}
    for t in parameters(spec):
        hf, ours, transposed = t.hf[0], t.name, t.hf_transposed
        for n in range(spec.n_layer) if "{n}" in hf else [None]:
            a = params[ours] if n is None else params[ours][n]
            if ours == "wte":
                a = a[:spec.vocab_size]
            out[PREFIX + hf.format(n=n)] = np.ascontiguousarray(a.T if transposed else a)
    return out


def gpt2_config(spec: Spec) -> dict:
    """config.json for transformers' GPT2LMHeadModel with the spec's sizes."""
    eot = spec.vocab_size - 1  # GPT-2's <|endoftext|> is the last token
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": spec.vocab_size,
        "n_positions": spec.max_seq_len,
        "n_ctx": spec.max_seq_len,
        "n_embd": spec.n_embd,
        "n_layer": spec.n_layer,
        "n_head": spec.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-05,
        "initializer_range": 0.02,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }
    if spec.padded_vocab_size != padded(spec.vocab_size):
        config[PADDING_KEY] = spec.padded_vocab_size
    return config


def export_hf(spec: Spec, params: dict[str, np.ndarray], out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmgenError(f"{out_dir}: cannot write the export there (not a directory)")
    model, config = out_dir / "model.safetensors", out_dir / "config.json"
    write_safetensors(model, hf_tensors(spec, params), {"format": "pt"})
    write_atomic(config, [(json.dumps(gpt2_config(spec), indent=2) + "\n").encode()])
    return model, config
