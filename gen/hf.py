"""Hugging Face weights in and out: transformers' GPT2LMHeadModel and LlamaForCausalLM layouts
in model.safetensors (or a sharded set with model.safetensors.index.json), with their
config.json, to an llm.c model checkpoint, and back.

The tensor list (tensors.parameters) names each tensor's Hugging Face tensors for the spec's
family (tensors.hf_family): "{n}" is the block index, and several names are stacked along the
first axis (our qkvw is q_proj, k_proj and v_proj one after the other).

GPT-2 (GPT2LMHeadModel):

    Hugging Face (transformers)                    llm.c
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

Llama (LlamaForCausalLM: RMSNorm, rotary positions, SwiGLU; KV = kv_heads * head size):

    model.embed_tokens.weight                  (V,C)   wte        (Vp,C)  rows V..Vp are padding
    model.layers.N.input_layernorm.weight      (C)     ln1w[N]    (C)
    model.layers.N.self_attn.q_proj.weight     (C,C)   qkvw[N]    (C+2KV,C)  rows 0..C
    model.layers.N.self_attn.k_proj.weight     (KV,C)             rows C..C+KV
    model.layers.N.self_attn.v_proj.weight     (KV,C)             rows C+KV..C+2KV
    model.layers.N.self_attn.o_proj.weight     (C,C)   attprojw[N] (C,C)
    model.layers.N.post_attention_layernorm.weight     ln2w[N]    (C)
    model.layers.N.mlp.gate_proj.weight        (H,C)   fcw[N]     (2H,C)  rows 0..H
    model.layers.N.mlp.up_proj.weight          (H,C)             rows H..2H
    model.layers.N.mlp.down_proj.weight        (C,H)   fcprojw[N] (C,H)
    model.norm.weight                          (C)     lnfw       (C)
    lm_head.weight (untied only)               (V,C)   lm_head    (Vp,C)  rows V..Vp are padding
    ... with attention_bias = mlp_bias = true, the q/k/v/o and gate/up/down biases likewise

Both store Linear weights (out, in), as llm.c does: nothing is transposed. transformers'
Llama checkpoints hold q_proj and k_proj in the rotate-half layout (their conversion script
permuted Meta's interleaved rows), which is the layout the reference and the trainer rotate
in (pair i of a head: channels i and i + HS/2), so they are copied as they are. Old files'
rotary_emb.inv_freq buffers (computed from rope_theta) are skipped.

safetensors is read and written here, without the safetensors package: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, optional
__metadata__}, then the raw little-endian tensor data. A sharded model is several such files,
listed by model.safetensors.index.json: {"metadata": {...}, "weight_map": {tensor: file}}.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from enum import Enum
from pathlib import Path

import numpy as np

from .enums import Mlp, Norm, Position
from .errors import LlmgenError
from .fileio import check_memory, from_bf16, open_regular, read_regular, write_atomic
from .spec import INT32_MAX, Spec, SpecError, from_dict, padded, safe_name
from .tensors import gpt2_parameters, hf_family, num_params, param_shapes, parameters
from .tokenizer import EOT_TOKEN, VOCAB_SIZE as GPT2_VOCAB_SIZE

MAX_HEADER_BYTES = 100 * 1024 * 1024
# safetensors dtype -> (numpy dtype of the stored data, bytes per value)
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
SHARD_NAME = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors")  # transformers' model-00001-of-00003.safetensors

# ---- GPT-2 ----
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
_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
_STR = (lambda v: isinstance(v, str), "a string")
_ARCHS = (lambda v: v is None or isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of strings")


def _or_null(check):
    return (lambda v: v is None or check[0](v), check[1] + " or null")


CONFIG_TYPES = {
    "model_type": _STR,
    "architectures": _ARCHS,
    "activation_function": _STR,
    "layer_norm_epsilon": _NUMBER,
    "scale_attn_weights": _BOOL, "scale_attn_by_inverse_layer_idx": _BOOL, "add_cross_attention": _BOOL,
    "vocab_size": _INT, "n_embd": _INT, "n_positions": _INT, "n_layer": _INT, "n_head": _INT,
    "n_inner": _or_null(_INT),
    "tie_word_embeddings": _BOOL,
    PADDING_KEY: _INT,
}

# ---- Llama ----
LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
LLAMA_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
LLAMA_SKIPPED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # a buffer from rope_theta
SILUS = ("silu", "swish")  # transformers' ACT2FN: both are x * sigmoid(x)
_DICT = (lambda v: isinstance(v, dict), "an object")
LLAMA_CONFIG_TYPES = {
    "model_type": _STR,
    "architectures": _ARCHS,
    "vocab_size": _INT, "hidden_size": _INT, "intermediate_size": _INT, "num_hidden_layers": _INT,
    "num_attention_heads": _INT, "max_position_embeddings": _INT,
    "num_key_value_heads": _or_null(_INT), "head_dim": _or_null(_INT),
    "rms_norm_eps": _NUMBER, "rope_theta": _NUMBER,
    "rope_scaling": _or_null(_DICT), "rope_parameters": _or_null(_DICT),
    "partial_rotary_factor": _or_null(_NUMBER),
    "tie_word_embeddings": _BOOL, "attention_bias": _BOOL, "mlp_bias": _BOOL,
    "hidden_act": _STR,
    "attention_dropout": _or_null(_NUMBER), "mlp_dropout": _or_null(_NUMBER),
    "pretraining_tp": _or_null(_INT),
    "sliding_window": _or_null(_INT), "use_sliding_window": _BOOL,
    "qk_norm": _BOOL, "use_qk_norm": _BOOL, "qk_layernorm": _BOOL,
    PADDING_KEY: _INT,
}
# the sizes a Llama config.json must give (save_pretrained always writes them)
LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# LlamaConfig's defaults for the other keys read here (transformers uses them when a key is absent)
LLAMA_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
# our spec field -> the Llama config.json key it comes from (for messages)
LLAMA_KEYS = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "channels": "hidden_size",
              "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
              "rope_theta": "rope_theta", "mlp_hidden": "intermediate_size", "kv_heads": "num_key_value_heads"}


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


# ---- the model's files -------------------------------------------------------------------
class TensorFiles:
    """The tensors of a model: those of one safetensors file, or of the shards that
    model.safetensors.index.json lists, each tensor in exactly one of them."""

    def __init__(self, where: dict[str, SafeTensors], described: str, path: Path):
        self.where = where          # tensor name -> the file holding it
        self.described = described  # for the notes: "dir/model.safetensors", "3 shards listed in ..."
        self.path = path            # the file (or index) named in messages

    @property
    def names(self):
        return self.where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)

    def file(self, name: str) -> Path:
        return self.where[name].path

    @classmethod
    def single(cls, path: Path) -> "TensorFiles":
        st = SafeTensors(path)
        return cls({name: st for name in st.entries}, str(path), path)

    @classmethod
    def sharded(cls, index: Path) -> "TensorFiles":
        weight_map = _read_index(index)
        shards: dict[str, SafeTensors] = {}
        for file in dict.fromkeys(weight_map.values()):
            if file in (".", "..") or "/" in file or "\\" in file or not file.isprintable():
                raise LlmgenError(f"{index}: weight_map names the shard {_brief(file)}, not a file name "
                                  "in this dir")
            path = index.parent / file
            if not os.path.lexists(path):
                raise LlmgenError(f"{index}: weight_map names the shard {file}, which is not in {index.parent}")
            shards[file] = SafeTensors(path)
        _check_shard_numbers(index, list(shards))
        held: dict[str, list[str]] = {}  # tensor name -> the shards whose header has it
        for file in sorted(shards):
            for name in shards[file].entries:
                held.setdefault(name, []).append(file)
        for name, files in held.items():
            if len(files) > 1:
                raise LlmgenError(f"{index}: tensor {name} is in two shards, {files[0]} and {files[1]}")
        where: dict[str, SafeTensors] = {}
        for name, (file,) in held.items():
            if name not in weight_map:
                raise LlmgenError(f"{index}: shard {file} holds tensor {name}, which weight_map does not list")
            if weight_map[name] != file:
                raise LlmgenError(f"{index}: weight_map puts tensor {name} in {weight_map[name]}, but it is in {file}")
            where[name] = shards[file]
        for name, file in weight_map.items():
            if name not in where:
                raise LlmgenError(f"{index}: weight_map puts tensor {name} in {file}, which does not hold it")
        count = f"{len(shards)} shard{'s' if len(shards) != 1 else ''}"
        return cls(where, f"{count} listed in {index}", index)


def _no_duplicates(pairs):
    """json object_pairs_hook: an object that names a key twice is refused."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def _read_json(path: Path, what: str, unique: bool = False) -> dict:
    """A JSON object from a file the user gave; unique: no key may appear twice in any object."""
    try:
        data = json.loads(read_regular(path, what).decode("utf-8"),
                          object_pairs_hook=_no_duplicates if unique else None)
    except _DuplicateKey as e:
        raise LlmgenError(f"{path}: {_brief(e.args[0])} is there twice (each key once)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmgenError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise LlmgenError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise LlmgenError(f"{path}: not a {what} (a JSON object)")
    return data


def _read_index(path: Path) -> dict[str, str]:
    """The weight_map of model.safetensors.index.json: tensor name -> shard file name."""
    index = _read_json(path, "safetensors index", unique=True)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise LlmgenError(f"{path}: weight_map must be an object of tensor name -> shard file, "
                          f"got {_brief(weight_map)}")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise LlmgenError(f"{path}: weight_map: tensor {_brief(name)} must name a shard file, got {_brief(file)}")
    if not weight_map:
        raise LlmgenError(f"{path}: weight_map lists no tensors")
    return weight_map


def _check_shard_numbers(index: Path, files: list[str]) -> None:
    """Shards named as transformers names them (model-00002-of-00003.safetensors) are all listed."""
    numbered = [m for f in files if (m := SHARD_NAME.fullmatch(f))]
    if not numbered or len(numbered) != len(files):
        return
    stems, totals = {m.group(1) for m in numbered}, {m.group(3) for m in numbered}
    if len(stems) != 1 or len(totals) != 1:
        return
    total = int(totals.pop())
    have = {int(m.group(2)) for m in numbered}
    missing = sorted(set(range(1, total + 1)) - have)
    if missing:
        stem, width = numbered[0].group(1), len(numbered[0].group(3))
        names = ", ".join(f"{stem}-{n:0{width}d}-of-{total:0{width}d}.safetensors" for n in missing)
        raise LlmgenError(f"{index}: weight_map lists {len(have)} of {total} shards: missing {names}")


def _find_files(source: Path) -> tuple[TensorFiles, Path | None]:
    """The tensors (model.safetensors, or the shards of model.safetensors.index.json) and the
    config.json beside them (None when absent), for a dir or a file."""
    if source.is_dir():
        model, index = source / SINGLE_FILE, source / INDEX_FILE
        if os.path.lexists(model):
            files = TensorFiles.single(model)
        elif os.path.lexists(index):
            files = TensorFiles.sharded(index)
        else:
            other = [p.name for p in source.glob("*.safetensors*")] + [p.name for p in source.glob("pytorch_model*.bin")]
            hint = (f" (found {', '.join(sorted(other))}; read are model.safetensors, or the shards that "
                    f"{INDEX_FILE} lists)") if other else ""
            raise LlmgenError(f"{source}: no model.safetensors in this dir, nor a {INDEX_FILE}{hint}")
    elif source.exists():
        files = TensorFiles.sharded(source) if source.name.endswith(".index.json") else TensorFiles.single(source)
    else:
        raise LlmgenError(f"{source}: no such file or dir")
    config = files.path.parent / "config.json"
    return files, config if config.exists() else None


def _check_types(path: Path, config: dict, types: dict) -> None:
    for key, (is_valid, expected) in types.items():
        if key in config and not is_valid(config[key]):
            raise LlmgenError(f"{path}: {key} must be {expected}, got {_brief(config[key])} "
                              f"({type(config[key]).__name__})")


# ---- import ------------------------------------------------------------------------------
def _parts(spec: Spec, t, rows: int) -> list[tuple[str, int]]:
    """(Hugging Face name, rows) of the tensors stacked, in order, into one block's slice of t
    (of `rows` rows): q, k and v into qkvw/qkvb; gate and up into fcw/fcb; else one tensor."""
    if len(t.hf) == 1:
        return [(t.hf[0], rows)]
    kv = spec.kv_head_count * spec.head_size
    split = {("qkvw", 3): (spec.n_embd, kv, kv), ("qkvb", 3): (spec.n_embd, kv, kv),
             ("fcw", 2): (spec.mlp_channels,) * 2, ("fcb", 2): (spec.mlp_channels,) * 2}[t.name, len(t.hf)]
    assert sum(split) == rows, (t.name, split, rows)
    return list(zip(t.hf, split))


def _vocab_rows(t) -> bool:
    """A tensor with a row per padded vocab entry (wte, lm_head): Hugging Face has the V real ones."""
    return t.shape[0] == "Vp"


def _layout(spec: Spec):
    """For every Hugging Face tensor of the spec: (its name with "{n}", the block index or None,
    our tensor, the first of our rows it fills, its shape there, transposed)."""
    sizes = param_shapes(spec)
    for t in parameters(spec):
        shape = sizes[t.name][1:] if t.per_layer else sizes[t.name]
        rows = spec.vocab_size if _vocab_rows(t) else shape[0]
        for n in range(spec.n_layer) if t.per_layer else [None]:
            row = 0
            for hf, count in _parts(spec, t, rows):
                yield hf.format(n=n), n, t.name, row, (count, *shape[1:]), t.hf_transposed
                row += count


def _load(spec: Spec, files: TensorFiles, resolve) -> dict[str, np.ndarray]:
    """Our parameters from the Hugging Face tensors (resolve: a layout name -> its name in the
    files, or an error): every tensor is checked to be there with its shape before anything is
    allocated; padded vocab rows stay zero."""
    plan = []
    for name, n, ours, row, shape, transposed in _layout(spec):
        full = resolve(name)
        want = shape[::-1] if transposed else shape
        if files.shape(full) != want:
            raise LlmgenError(f"{files.file(full)}: tensor {full} has shape {list(files.shape(full))}, "
                              f"expected {list(want)}")
        plan.append((full, n, ours, row, shape[0], transposed))
    n_params = num_params(spec)
    check_memory(files.path, 4 * n_params, f"the model's {n_params:,} parameters")
    try:
        params = {name: np.zeros(shape, dtype=np.float32) for name, shape in param_shapes(spec).items()}
    except MemoryError:
        raise LlmgenError(f"{files.path}: not enough memory for the model's {n_params:,} parameters") from None
    for full, n, ours, row, count, transposed in plan:
        a = files.get(full)
        dest = params[ours] if n is None else params[ours][n]
        dest[row:row + count] = a.T if transposed else a
    return params


def _config_padding(config: dict | None, V: int, padded_vocab_size: int | None) -> int:
    if padded_vocab_size is not None:
        return padded_vocab_size
    return config.get(PADDING_KEY, padded(V)) if config else padded(V)


def _tied_head(files: TensorFiles, head: str, embed: str, params, V: int, config_path) -> None:
    """A tied model's lm_head.weight, when a file holds it anyway, must be the embedding."""
    if files.shape(head) != files.shape(embed) or not np.array_equal(files.get(head), params["wte"][:V]):
        raise LlmgenError(f"{files.file(head)}: {head} differs from {embed}, but "
                          f"{config_path or 'a GPT-2 without config.json'} ties them (tie_word_embeddings true): "
                          "which of the two is the output layer is ambiguous")


def import_hf(source: str | Path, heads: int | None = None, padded_vocab_size: int | None = None,
              name: str = "hf", max_seq_len: int | None = None) -> tuple[Spec, dict[str, np.ndarray], list[str]]:
    """Read a Hugging Face GPT-2 or Llama; returns (spec, params in llm.c's layout, notes to print).

    The vocab is padded to padded_vocab_size if given, else to the value an llmgen export
    recorded in config.json (PADDING_KEY), else to a multiple of 128. max_seq_len caps a
    Llama's context (max_position_embeddings)."""
    files, config_path = _find_files(Path(source))
    config = _read_json(config_path, "model config") if config_path else None
    if config is not None:
        _check_types(config_path, config, {"model_type": _STR, "architectures": _ARCHS})
        model_type = config.get("model_type")
        if model_type == "llama":
            return _import_llama(files, config_path, config, heads, padded_vocab_size, name, max_seq_len)
        if model_type != "gpt2":
            archs = config.get("architectures") or []
            raise LlmgenError(f"{config_path}: model_type {model_type!r} with architectures {archs} is neither "
                              f"GPT-2 nor Llama (expected model_type 'gpt2' with architectures among "
                              f"{', '.join(ARCHITECTURES)}, or 'llama' with {', '.join(LLAMA_ARCHITECTURES)})")
    elif "model.embed_tokens.weight" in files.names:
        raise LlmgenError(f"{files.path}: holds a Llama's tensors (model.embed_tokens.weight) but there is no "
                          "config.json beside it: its sizes, rope_theta and rms_norm_eps come from there")
    if max_seq_len is not None:
        raise LlmgenError("--max-seq-len caps a rotary (Llama) model's context; a GPT-2's is its wpe's "
                          "rows (n_positions)")
    return _import_gpt2(files, config_path, config, heads, padded_vocab_size, name)


# ---- import: GPT-2 -----------------------------------------------------------------------
def _check_gpt2_config(path: Path, config: dict) -> None:
    _check_types(path, config, CONFIG_TYPES)
    archs = config.get("architectures") or []
    if any(a not in ARCHITECTURES for a in archs):
        raise LlmgenError(f"{path}: model_type 'gpt2' with architectures {archs} is not GPT-2 "
                          f"(expected architectures among {', '.join(ARCHITECTURES)})")
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


def _import_gpt2(files: TensorFiles, config_path: Path | None, config: dict | None, heads: int | None,
                 padded_vocab_size: int | None, name: str):
    if config is not None:
        _check_gpt2_config(config_path, config)
    where = files.path
    notes = [f"read {files.described}" + (f" and {config_path}" if config_path else " (no config.json)")]

    # the names without the optional "transformer." prefix
    names: dict[str, str] = {}
    for full in files.names:
        short = full.removeprefix(PREFIX)
        if short in names:
            raise LlmgenError(f"{where}: tensor {short} is there twice, as {names[short]} and {full}")
        names[short] = full
    layers = sorted({int(m.group(1)) for n in names if (m := BLOCK.match(n))})
    L = layers[-1] + 1 if layers else 0
    templates = {p.hf[0] for p in gpt2_parameters()}
    for short, full in names.items():
        known = short == "lm_head.weight" or SKIPPED.fullmatch(short) or BLOCK.sub("h.{n}.", short, 1) in templates
        if not known:
            raise LlmgenError(f"{files.file(full)}: unexpected tensor {full} (not part of GPT-2's layout)")

    def tensor(short: str) -> str:
        if short not in names:
            raise LlmgenError(f"{where}: missing tensor {short} (or {PREFIX}{short})")
        return names[short]

    # the sizes, from the tensors' shapes, checked against config.json
    wte_shape, wpe_shape = files.shape(tensor("wte.weight")), files.shape(tensor("wpe.weight"))
    if len(wte_shape) != 2 or len(wpe_shape) != 2 or wte_shape[1] != wpe_shape[1]:
        raise LlmgenError(f"{where}: unexpected shapes {list(wte_shape)} of wte.weight and "
                          f"{list(wpe_shape)} of wpe.weight (expected (vocab, C) and (positions, C))")
    V, C = wte_shape
    maxT = wpe_shape[0]
    if L == 0:
        raise LlmgenError(f"{where}: missing tensor h.0.ln_1.weight (no transformer blocks)")
    tied = True
    if config:
        for key, have in (("vocab_size", V), ("n_embd", C), ("n_positions", maxT), ("n_layer", L)):
            if key in config and config[key] != have:
                raise LlmgenError(f"{config_path}: {key} is {config[key]}, but the tensors in {where} "
                                  f"have {have}")
        if config.get("n_inner") not in (None, 4 * C):
            raise LlmgenError(f"{config_path}: n_inner {config['n_inner']} is not 4 * n_embd = {4 * C}")
        if heads is not None and config.get("n_head", heads) != heads:
            raise LlmgenError(f"--heads {heads} differs from n_head {config['n_head']} in {config_path}")
        heads = config.get("n_head", heads)
        tied = config.get("tie_word_embeddings", True)  # GPT2Config's default
    if heads is None:
        if C % 64:
            raise LlmgenError(f"{where}: no config.json to give the number of heads, and {C} channels "
                              "are not a multiple of GPT-2's head size 64: pass --heads")
        heads = C // 64
        notes.append(f"no config.json: assuming GPT-2's head size 64, so {heads} heads (--heads sets them)")
    raw = {"name": safe_name(name), "layers": L, "heads": heads, "channels": C, "vocab_size": V,
           "padded_vocab_size": _config_padding(config, V, padded_vocab_size), "max_seq_len": maxT}
    if not tied:
        raw["tie_embeddings"] = False
    spec = from_dict(raw, str(config_path or where))
    if not all(p.hf for p in parameters(spec)):
        raise LlmgenError(f"{config_path}: tie_word_embeddings is false: a GPT-2 with an untied lm_head cannot "
                          "be imported yet (llmgen's tensor list names no Hugging Face tensors for GPT-2's "
                          "blocks with an untied classifier)")
    params = _load(spec, files, tensor)
    if tied and "lm_head.weight" in names:
        _tied_head(files, names["lm_head.weight"], tensor("wte.weight"), params, V, config_path)
    return spec, params, notes


# ---- import: Llama -----------------------------------------------------------------------
def _rope(path: Path, config: dict) -> tuple[str, dict]:
    """The rotary settings as transformers reads them: a non-empty rope_scaling (the old key)
    takes the place of rope_parameters; returns (the key they came from, the settings)."""
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(key) or {}
    for field, check in (("rope_type", _STR), ("type", _STR), ("rope_theta", _NUMBER),
                         ("partial_rotary_factor", _or_null(_NUMBER))):
        if field in rope and not check[0](rope[field]):
            raise LlmgenError(f"{path}: {key}.{field} must be {check[1]}, got {_brief(rope[field])} "
                              f"({type(rope[field]).__name__})")
    return key, rope


def _llama_spec_raw(path: Path, config: dict, notes: list[str], heads: int | None, padded_vocab_size: int | None,
                    name: str, max_seq_len: int | None) -> dict:
    """Spec data (TOML keys) for a Llama config.json, every key llmgen cannot compute refused."""
    _check_types(path, config, LLAMA_CONFIG_TYPES)
    archs = config.get("architectures") or []
    if any(a not in LLAMA_ARCHITECTURES for a in archs):
        raise LlmgenError(f"{path}: model_type 'llama' with architectures {archs}: llmgen reads "
                          f"{', '.join(LLAMA_ARCHITECTURES)}")
    for key in LLAMA_REQUIRED:
        if key not in config:
            raise LlmgenError(f"{path}: {key} missing (a Llama's config.json gives {', '.join(LLAMA_REQUIRED)})")
    get = lambda key: config[key] if key in config else LLAMA_DEFAULTS[key]  # noqa: E731
    C, NH = config["hidden_size"], config["num_attention_heads"]
    if heads is not None and heads != NH:
        raise LlmgenError(f"--heads {heads} differs from num_attention_heads {NH} in {path}")

    problems = []
    act = get("hidden_act")
    if act not in SILUS:
        problems.append(f"hidden_act {act!r} (SwiGLU computes silu(gate) * up: {' or '.join(SILUS)})")
    rope_key, rope = _rope(path, config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"{rope_key} with rope_type {rope_type!r} (the trainer computes plain rotary "
                        "positions, rope_type 'default')")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1):
        where = f"{rope_key}.partial_rotary_factor" if "partial_rotary_factor" in rope else "partial_rotary_factor"
        problems.append(f"{where} {partial} (the trainer rotates every channel of a head)")
    if config.get("use_sliding_window") or (config.get("sliding_window") is not None
                                            and config.get("use_sliding_window") is not False):
        key = "use_sliding_window" if config.get("use_sliding_window") else "sliding_window"
        problems.append(f"{key} {json.dumps(config[key])} (the trainer's attention sees every earlier position)")
    for key in ("qk_norm", "use_qk_norm", "qk_layernorm"):
        if config.get(key):
            problems.append(f"{key} true (the trainer has no norm on q and k)")
    head_dim = config.get("head_dim")
    if head_dim is not None and NH > 0 and head_dim * NH != C:  # (heads <= 0: from_dict refuses them)
        problems.append(f"head_dim {head_dim} (llmgen's head size is hidden_size / num_attention_heads = "
                        f"{C}/{NH}{f' = {C // NH}' if C % NH == 0 else ''})")
    if get("attention_bias") != get("mlp_bias"):
        problems.append(f"attention_bias {str(get('attention_bias')).lower()} with mlp_bias "
                        f"{str(get('mlp_bias')).lower()} (llmgen's spec has one bias key for every linear layer: "
                        "both true or both false)")
    if problems:
        raise LlmgenError(f"{path}: a Llama variant llmgen's trainer does not compute: {'; '.join(problems)}")
    for key in ("attention_dropout", "mlp_dropout"):
        if config.get(key):
            notes.append(f"{key} {config[key]} is not used: dropout is off at inference, and the trainer has none")
    if (config.get("pretraining_tp") or 1) > 1:
        notes.append(f"pretraining_tp {config['pretraining_tp']} does not change the model: transformers "
                     "at most slices its matmuls by it")

    theta = rope.get("rope_theta", get("rope_theta"))
    V = config["vocab_size"]
    maxT = get("max_position_embeddings")
    if max_seq_len is not None:
        if max_seq_len > maxT:
            raise LlmgenError(f"--max-seq-len {max_seq_len} is more than max_position_embeddings {maxT} "
                              f"in {path}: it caps the context, it does not extend it")
        if max_seq_len < maxT:
            notes.append(f"context capped at --max-seq-len {max_seq_len} (max_position_embeddings is {maxT})")
        maxT = max_seq_len
    elif maxT * C > INT32_MAX:
        raise LlmgenError(f"{path}: max_position_embeddings {maxT} is too large for the trainer: "
                          f"max_seq_len x hidden_size = {maxT * C:,} exceeds 2**31 - 1; pass --max-seq-len "
                          f"(at most {INT32_MAX // C:,}) to cap the context")
    return {"name": safe_name(name), "layers": config["num_hidden_layers"], "heads": NH, "channels": C,
            "vocab_size": V, "padded_vocab_size": _config_padding(config, V, padded_vocab_size), "max_seq_len": maxT,
            "norm": Norm.RMSNORM.value, "norm_eps": get("rms_norm_eps"), "position": Position.ROPE.value,
            "rope_theta": theta, "mlp": Mlp.SWIGLU.value, "mlp_hidden": config["intermediate_size"],
            "kv_heads": NH if config.get("num_key_value_heads") is None else config["num_key_value_heads"],
            "bias": get("attention_bias"),
            "tie_embeddings": get("tie_word_embeddings")}


def _llama_spec(path: Path, raw: dict) -> Spec:
    """from_dict's checks, its messages naming the config.json keys."""
    try:
        return from_dict(raw, str(path))
    except SpecError as e:
        message = str(e)
        for ours, theirs in LLAMA_KEYS.items():
            message = message.replace(f"field '{ours}'", f"{theirs} (spec field '{ours}')")
        raise LlmgenError(message) from None


def _import_llama(files: TensorFiles, config_path: Path, config: dict, heads: int | None,
                  padded_vocab_size: int | None, name: str, max_seq_len: int | None):
    notes = [f"read {files.described} and {config_path} (LlamaForCausalLM)"]
    spec = _llama_spec(config_path, _llama_spec_raw(config_path, config, notes, heads, padded_vocab_size, name,
                                                    max_seq_len))
    assert hf_family(spec) == "llama", spec
    L = spec.n_layer
    per_layer = {hf for t in parameters(spec) if t.per_layer for hf in t.hf}
    whole = {hf for t in parameters(spec) if not t.per_layer for hf in t.hf}
    tied_head = "lm_head.weight" if spec.tie_embeddings else None
    for full in files.names:
        m = LLAMA_LAYER.match(full)
        if full in whole or full == tied_head or LLAMA_SKIPPED.fullmatch(full):
            continue
        if m and int(m.group(1)) < L and LLAMA_LAYER.sub("model.layers.{n}.", full, 1) in per_layer:
            continue
        raise LlmgenError(f"{files.file(full)}: unexpected tensor {full} "
                          f"({_why_unexpected(full, m, spec, config_path)})")

    def tensor(full: str) -> str:
        if full not in files.names:
            hint = ""
            if full == "lm_head.weight":
                default = "" if "tie_word_embeddings" in config else ", LlamaConfig's default when the key is absent"
                hint = f" (the output layer: tie_word_embeddings is false in {config_path}{default})"
            raise LlmgenError(f"{files.path}: missing tensor {full}{hint}")
        return full
    params = _load(spec, files, tensor)
    if tied_head in files.names:
        _tied_head(files, tied_head, "model.embed_tokens.weight", params, spec.vocab_size, config_path)
    return spec, params, notes


def _why_unexpected(full: str, m, spec: Spec, config_path: Path) -> str:
    if m and int(m.group(1)) >= spec.n_layer:
        return f"num_hidden_layers is {spec.n_layer} in {config_path}"
    if full.endswith(("_proj.bias",)) and not spec.bias:
        key = "attention_bias" if ".self_attn." in full else "mlp_bias"
        return f"{key} is false in {config_path}"
    if re.search(r"\.(q|k)_(norm|layernorm)\.", full):
        return "a norm on q or k, which the trainer does not compute"
    return "not part of LlamaForCausalLM's layout for this config"


# ---- export ------------------------------------------------------------------------------
def hf_tensors(spec: Spec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of the spec's family (GPT2LMHeadModel's or
    LlamaForCausalLM's), without a tied lm_head.weight, padded vocab rows dropped."""
    gpt2 = hf_family(spec) == "gpt2"
    out = {}
    for name, n, ours, row, shape, transposed in _layout(spec):
        a = (params[ours] if n is None else params[ours][n])[row:row + shape[0]]
        prefix = PREFIX if gpt2 and name != "lm_head.weight" else ""  # GPT2LMHeadModel's lm_head is outside
        out[prefix + name] = np.ascontiguousarray(a.T if transposed else a)
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
    }
    return {**config, **_config_tail(spec, eot)}


def llama_config(spec: Spec) -> dict:
    """config.json for transformers' LlamaForCausalLM with the spec's sizes and blocks. rope_theta
    is given both as transformers 4 reads it and inside rope_parameters, as transformers 5
    writes it; bos and eos are GPT-2's <|endoftext|> when the vocab is GPT-2's, else null."""
    eot = EOT_TOKEN if spec.vocab_size == GPT2_VOCAB_SIZE else None
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.n_embd,
        "intermediate_size": spec.mlp_channels,
        "num_hidden_layers": spec.n_layer,
        "num_attention_heads": spec.n_head,
        "num_key_value_heads": spec.kv_head_count,
        "head_dim": spec.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_seq_len,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "rope_scaling": None,
        "attention_bias": spec.bias,
        "mlp_bias": spec.bias,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
    }
    return {**config, **_config_tail(spec, eot)}


def _config_tail(spec: Spec, eot: int | None) -> dict:
    """The keys both families' config.json end with: the tying, the special tokens, the dtype,
    and llmgen's padded vocab where it is not the one transformers' vocab implies."""
    tail = {"tie_word_embeddings": spec.tie_embeddings, "use_cache": True, "bos_token_id": eot,
            "eos_token_id": eot, "torch_dtype": "float32"}
    if spec.padded_vocab_size != padded(spec.vocab_size):
        tail[PADDING_KEY] = spec.padded_vocab_size
    return tail


def _show(value) -> str:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_exportable(spec: Spec, source: str) -> str:
    """The architecture export_hf writes for the spec ("GPT2LMHeadModel" or "LlamaForCausalLM"),
    or an error naming the keys that neither can express."""
    family = hf_family(spec)
    if family == "gpt2":
        return "GPT2LMHeadModel"
    if family == "llama":
        return "LlamaForCausalLM"
    gpt2 = ", ".join(f"{k} {_show(v)}" for k, v in spec.arch().items())
    need = {"norm": Norm.RMSNORM, "position": Position.ROPE, "mlp": Mlp.SWIGLU}
    llama = ", ".join(f"{k} {_show(getattr(spec, k))}" for k, v in need.items() if getattr(spec, k) is not v)
    raise LlmgenError(f"{source}: no Hugging Face architecture llmgen writes holds these blocks: "
                      f"GPT2LMHeadModel has GPT-2's (this model has {gpt2}), LlamaForCausalLM has norm rmsnorm, "
                      f"position rope and mlp swiglu (this model has {llama})")


def export_hf(spec: Spec, params: dict[str, np.ndarray], out_dir: str | Path,
              source: str = "the model") -> tuple[Path, Path, str]:
    """model.safetensors (float32) and config.json in out_dir; returns them and the architecture."""
    architecture = check_exportable(spec, source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmgenError(f"{out_dir}: cannot write the export there (not a directory)")
    model, config = out_dir / SINGLE_FILE, out_dir / "config.json"
    write_safetensors(model, hf_tensors(spec, params), {"format": "pt"})
    data = gpt2_config(spec) if architecture == "GPT2LMHeadModel" else llama_config(spec)
    write_atomic(config, [(json.dumps(data, indent=2) + "\n").encode()])
    return model, config, architecture
