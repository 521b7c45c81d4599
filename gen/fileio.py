"""llm.c's binary formats, read and written from Python.

Model checkpoint: 256 int32 header [magic 20240326, version, maxT, V, L, NH, C, Vp, 0...],
then the PARAMS tensors in order (version 3: float32). Token shard: 256 int32 header
[magic 20240520, version 1, token count, 0...], then uint16 tokens.
Every write goes to a temporary file in the same folder and is renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import LlmgenError
from .spec import Spec, from_dict
from .tensors import PARAMS, num_params, param_sizes, unflatten

HEADER_INTS = 256
MODEL_MAGIC, MODEL_VERSION_FP32 = 20240326, 3
SHARD_MAGIC, SHARD_VERSION = 20240520, 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, chunks) -> None:
    """Write byte chunks to path via a temporary file and a rename: no half-written file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise LlmgenError(f"{path}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise LlmgenError(f"{path}: cannot write ({e.strerror})") from None
        raise


def _read_header(path: Path, magic: int, what: str) -> tuple[np.ndarray, bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LlmgenError(f"{path}: no such {what}") from None
    except OSError as e:
        raise LlmgenError(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(data) < HEADER_INTS * 4:
        raise LlmgenError(f"{path}: truncated {what}: {len(data)} bytes, shorter than its 1024-byte header")
    header = np.frombuffer(data[:HEADER_INTS * 4], dtype="<i4")
    if header[0] != magic:
        raise LlmgenError(f"{path}: not an llm.c {what} (magic {header[0]}, expected {magic})")
    return header, data[HEADER_INTS * 4:]


def model_header(spec: Spec, version: int = MODEL_VERSION_FP32) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [MODEL_MAGIC, version, spec.max_seq_len, spec.vocab_size, spec.n_layer,
                  spec.n_head, spec.n_embd, spec.padded_vocab_size]
    return header


def write_model(path, spec: Spec, params: dict[str, np.ndarray]) -> None:
    sizes = param_sizes(spec.dims)
    chunks = [model_header(spec).tobytes()]
    for t in PARAMS:
        a = np.ascontiguousarray(params[t.name], dtype="<f4")
        if a.shape != sizes[t.name]:
            raise ValueError(f"{t.name}: shape {a.shape}, expected {sizes[t.name]}")
        chunks.append(a.tobytes())
    write_atomic(path, chunks)


def spec_from_header(header: np.ndarray, source: str) -> Spec:
    raw = {"name": Path(source).stem, "max_seq_len": int(header[2]), "vocab_size": int(header[3]),
           "layers": int(header[4]), "heads": int(header[5]), "channels": int(header[6]),
           "padded_vocab_size": int(header[7])}
    return from_dict(raw, source)


def read_model(path) -> tuple[Spec, dict[str, np.ndarray]]:
    path = Path(path)
    header, body = _read_header(path, MODEL_MAGIC, "model checkpoint")
    if header[1] != MODEL_VERSION_FP32:
        raise LlmgenError(f"{path}: model checkpoint version {header[1]} is not supported (expected 3, fp32)")
    spec = spec_from_header(header, str(path))
    need = num_params(spec.dims) * 4
    if len(body) != need:
        raise LlmgenError(f"{path}: model checkpoint holds {len(body)} bytes of parameters, "
                          f"its header's sizes need {need}")
    return spec, unflatten(np.frombuffer(body, dtype="<f4").copy(), spec.dims)


def write_shard(path, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError("tokens must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [SHARD_MAGIC, SHARD_VERSION, tokens.size]
    write_atomic(path, [header.tobytes(), tokens.astype("<u2").tobytes()])


def read_shard(path) -> np.ndarray:
    path = Path(path)
    header, body = _read_header(path, SHARD_MAGIC, "token shard")
    if header[1] != SHARD_VERSION:
        raise LlmgenError(f"{path}: token shard version {header[1]} is not supported (expected 1)")
    if len(body) != 2 * int(header[2]):
        raise LlmgenError(f"{path}: token shard header says {header[2]} tokens, file holds {len(body) // 2}")
    return np.frombuffer(body, dtype="<u2").copy()
