"""llm.c's binary formats, read and written from Python.

Model checkpoint: 256 int32 header [magic 20240326, version, maxT, V, L, NH, C, Vp, 0...],
then the tensors.parameters(spec) tensors in order: version 3 stores them as float32, version 5 as bfloat16.
A model with other blocks than GPT-2's (a Llama-style one) is version 13 (float32) or 15
(bfloat16), versions llm.c does not read, with its blocks in the header's spare slots
(ARCH_SLOTS), so that it can never be loaded as another architecture.
Token shard: 256 int32 header [magic 20240520, version 1, token count, 0...], then uint16
tokens. Every write goes to a temporary file in the same folder and is renamed into place.

bfloat16 is the top half of a float32: sign, the same 8-bit exponent, 7 of the 23 fraction
bits. Reading one back is exact (append 16 zero bits). Writing rounds to nearest, ties to
even. For x in bfloat16's normal range (2^-126 <= |x| < 2^128 - 2^119, beyond which it
rounds to infinity) with 2^e <= |x| < 2^(e+1), b = bf16(x) is off by at most half the
spacing 2^(e-7) of 8 significant bits: |b - x| <= 2^(e-8) <= 2^-8 |x|, and also
<= 2^-8 |b|, with equality at ties such as x = 1 + 2^-8, which rounds (to even) to b = 1.
Below 2^-126 (float32 subnormals) the absolute error is at most 2^-134. Infinities stay
infinities, a NaN stays a NaN (quiet, sign kept), signed zeros keep their sign, and finite
values too large for bfloat16 round to infinity as IEEE rounding prescribes.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import numpy as np

from .errors import LlmgenError
from .spec import Spec, from_dict, safe_name
from .tensors import num_params, param_shapes, unflatten

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MODEL_MAGIC = 20240326
MODEL_VERSION_FP32, MODEL_VERSION_BF16 = 3, 5
ARCH_VERSION_OFFSET = 10  # a variant's version: 13 (fp32) or 15 (bf16)
# version -> (dtype name, bytes per parameter)
MODEL_VERSIONS = {MODEL_VERSION_FP32: ("fp32", 4), MODEL_VERSION_BF16: ("bf16", 2),
                  MODEL_VERSION_FP32 + ARCH_VERSION_OFFSET: ("fp32", 4),
                  MODEL_VERSION_BF16 + ARCH_VERSION_OFFSET: ("bf16", 2)}
DTYPE_VERSIONS = {"fp32": MODEL_VERSION_FP32, "bf16": MODEL_VERSION_BF16}
# The blocks of a version 13/15 file, in the header's spare int32 slots: [8] the layout of these
# slots (1), [9] norm (0 layernorm, 1 rmsnorm), [10] position (0 learned, 1 rope), [11] mlp
# (0 gelu, 1 swiglu, 2 relu2), [12] mlp_hidden, [13] kv_heads, [14] bias (0/1),
# [15] tie_embeddings (0/1), [16:18] norm_eps and [18:20] rope_theta as float64.
ARCH_SLOTS_LAYOUT = 1
ARCH_CODES = {"norm": ("layernorm", "rmsnorm"), "position": ("learned", "rope"), "mlp": ("gelu", "swiglu", "relu2")}
SHARD_MAGIC, SHARD_VERSION = 20240520, 1


def _umask() -> int:
    mask = os.umask(0o022)
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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private (0600); a plain file is not
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise LlmgenError(f"{path}: cannot write ({e.strerror})") from None
        raise


# ---- reading the user's files -----------------------------------------------------------
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(path: Path, mode: int, what: str) -> LlmgenError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
    return LlmgenError(f"{path}: not a regular file ({kind}), cannot read it as a {what}")


def open_regular(path: str | os.PathLike, what: str = "file"):
    """A binary file object for a file the user named, refusing anything that is not a regular
    file (a FIFO or a device would block or never end, a folder is no file) before reading.

    The path is checked with stat before it is opened, and the opened file again with fstat:
    the open itself is non-blocking, so a FIFO swapped in between cannot hang it either."""
    path = Path(path)
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            raise _not_regular(path, mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LlmgenError(f"{path}: no such {what}") from None
    except OSError as e:
        raise LlmgenError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
            raise _not_regular(path, mode, what)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of a regular file the user named (see open_regular)."""
    with open_regular(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise LlmgenError(f"{path}: cannot read {what} ({e.strerror})") from None


def check_memory(path, nbytes: int, what: str) -> None:
    """Refuse to allocate more than this machine's memory for what a file claims to hold."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if nbytes > total:
        raise LlmgenError(f"{path}: too large to load: {what} need {nbytes / 2**30:,.1f} GiB of memory, "
                          f"more than this machine's {total / 2**30:,.1f} GiB")


# ---- bfloat16 ----------------------------------------------------------------------------
def to_bf16(a) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    bits = np.asarray(a, dtype="<f4").view("<u4")
    # adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the
    # dropped half is above 0x8000, or equal to it with an odd kept half
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype("<u2")
    # a NaN's fraction may sit in the dropped half only (and rounding could carry into the
    # sign): keep its sign and top bits, and set the quiet bit so it stays a NaN
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((bits >> 16) | np.uint32(0x0040)).astype("<u2"), rounded)


def from_bf16(bits) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")


# ---- model checkpoints -------------------------------------------------------------------
def _read_header(path: Path, magic: int, what: str) -> tuple[np.ndarray, int]:
    """The 256-int header, checked for its magic, and the size of the whole file."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_BYTES:
            raise LlmgenError(f"{path}: truncated {what}: {size} bytes, shorter than its {HEADER_BYTES}-byte header")
        try:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
        except OSError as e:
            raise LlmgenError(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(header) < HEADER_INTS:  # the file shrank under us
        raise LlmgenError(f"{path}: truncated {what}")
    if header[0] != magic:
        raise LlmgenError(f"{path}: not an llm.c {what} (magic {header[0]}, expected {magic})")
    return header, size


def _read_body(path: Path, dtype: str, count: int, what: str) -> np.ndarray:
    with open_regular(path, what) as f:
        try:
            return np.fromfile(f, dtype=dtype, count=count, offset=HEADER_BYTES)
        except OSError as e:
            raise LlmgenError(f"{path}: cannot read {what} ({e.strerror})") from None


def model_version(spec: Spec, dtype: str) -> int:
    """The checkpoint version for a spec stored as dtype ("fp32" or "bf16"): llm.c's 3 or 5 for
    GPT-2's blocks, 13 or 15 for others."""
    return DTYPE_VERSIONS[dtype] + (0 if spec.is_gpt2 else ARCH_VERSION_OFFSET)


def model_header(spec: Spec, version: int = MODEL_VERSION_FP32) -> np.ndarray:
    """The header of a checkpoint; version 3 or 5 gives the spec's own (13 or 15 for a variant)."""
    version = model_version(spec, MODEL_VERSIONS[version][0])
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [MODEL_MAGIC, version, spec.max_seq_len, spec.vocab_size, spec.n_layer,
                  spec.n_head, spec.n_embd, spec.padded_vocab_size]
    if not spec.is_gpt2:
        header[8:16] = [ARCH_SLOTS_LAYOUT, ARCH_CODES["norm"].index(spec.norm.value),
                        ARCH_CODES["position"].index(spec.position.value), ARCH_CODES["mlp"].index(spec.mlp.value),
                        spec.mlp_channels, spec.kv_head_count, int(spec.bias), int(spec.tie_embeddings)]
        header[16:20] = np.array([spec.norm_eps, spec.rope_theta], dtype="<f8").view("<i4")
    return header


def write_model(path, spec: Spec, params: dict[str, np.ndarray], version: int = MODEL_VERSION_FP32) -> None:
    """Write a model checkpoint: version 3 (float32) or 5 (bfloat16, rounded to nearest even);
    a spec with other blocks than GPT-2's is written as 13 or 15."""
    if version not in MODEL_VERSIONS:
        raise ValueError(f"model checkpoint version {version}: expected 3 (fp32) or 5 (bf16)")
    fp32 = MODEL_VERSIONS[version][0] == "fp32"
    chunks = [model_header(spec, version).tobytes()]
    for name, shape in param_shapes(spec).items():
        a = np.asarray(params[name])
        if a.shape != shape:
            raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
        a = np.ascontiguousarray(a, dtype="<f4")
        chunks.append((a if fp32 else to_bf16(a)).reshape(-1).data)  # no copies
    write_atomic(path, chunks)


def spec_from_header(header: np.ndarray, source: str, name: str | None = None) -> Spec:
    raw = {"name": safe_name(name or Path(source).stem), "max_seq_len": int(header[2]), "vocab_size": int(header[3]),
           "layers": int(header[4]), "heads": int(header[5]), "channels": int(header[6]),
           "padded_vocab_size": int(header[7])}
    if int(header[1]) in (MODEL_VERSION_FP32 + ARCH_VERSION_OFFSET, MODEL_VERSION_BF16 + ARCH_VERSION_OFFSET):
        if int(header[8]) != ARCH_SLOTS_LAYOUT:
            raise LlmgenError(f"{source}: header slot 8 (the layout of the blocks) is {int(header[8])}, "
                              f"expected {ARCH_SLOTS_LAYOUT}")
        for slot, key in ((9, "norm"), (10, "position"), (11, "mlp")):
            code = int(header[slot])
            if not 0 <= code < len(ARCH_CODES[key]):
                raise LlmgenError(f"{source}: header slot {slot} ({key}) is {code}, not one of "
                                  f"{', '.join(f'{i} ({v})' for i, v in enumerate(ARCH_CODES[key]))}")
            raw[key] = ARCH_CODES[key][code]
        raw.update(mlp_hidden=int(header[12]), kv_heads=int(header[13]))
        for slot, key in ((14, "bias"), (15, "tie_embeddings")):
            if int(header[slot]) not in (0, 1):
                raise LlmgenError(f"{source}: header slot {slot} ({key}) is {int(header[slot])}, not 0 or 1")
            raw[key] = bool(header[slot])
        norm_eps, rope_theta = (float(x) for x in np.asarray(header[16:20], dtype="<i4").view("<f8"))
        raw["norm_eps"] = norm_eps
        if raw["position"] == "rope":
            raw["rope_theta"] = rope_theta
    spec = from_dict(raw, source)
    if spec.is_gpt2 != (int(header[1]) in (MODEL_VERSION_FP32, MODEL_VERSION_BF16)):
        raise LlmgenError(f"{source}: version {int(header[1])} does not match the blocks its header describes")
    return spec


def read_model_spec(path) -> tuple[Spec, int]:
    """The spec and version of a model checkpoint, from its header; the file's size is checked
    against them, but the parameters are not read."""
    path = Path(path)
    header, size = _read_header(path, MODEL_MAGIC, "model checkpoint")
    version = int(header[1])
    if version not in MODEL_VERSIONS:
        raise LlmgenError(f"{path}: model checkpoint version {version} is not supported "
                          "(expected 3, fp32, or 5, bf16; 13 or 15 for other blocks than GPT-2's)")
    spec = spec_from_header(header, f"checkpoint {path}", name=path.stem)
    dtype, width = MODEL_VERSIONS[version]
    need = num_params(spec) * width
    if size - HEADER_BYTES != need:
        raise LlmgenError(f"{path}: model checkpoint holds {size - HEADER_BYTES} bytes of parameters, "
                          f"its header's sizes need {need} ({dtype}, version {version})")
    return spec, version


def read_model(path, with_version: bool = False):
    """(spec, params as float32 arrays), plus the version if with_version; bfloat16 is widened
    exactly."""
    spec, version = read_model_spec(path)
    n = num_params(spec)
    # the file's size matches the header (read_model_spec); a sparse file can still claim
    # more than fits in memory
    fp32 = MODEL_VERSIONS[version][0] == "fp32"
    check_memory(path, n * (4 if fp32 else 6), f"the checkpoint's {n:,} parameters")
    try:
        if fp32:
            flat = _read_body(Path(path), "<f4", n, "model checkpoint")
        else:
            flat = from_bf16(_read_body(Path(path), "<u2", n, "model checkpoint"))
    except MemoryError:
        raise LlmgenError(f"{path}: not enough memory to load the model checkpoint ({n:,} parameters)") from None
    if flat.size != n:  # the file changed under us
        raise LlmgenError(f"{path}: truncated model checkpoint")
    params = unflatten(flat, spec)
    return (spec, params, version) if with_version else (spec, params)


def write_shard(path, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError("tokens must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [SHARD_MAGIC, SHARD_VERSION, tokens.size]
    write_atomic(path, [header.tobytes(), tokens.astype("<u2").tobytes()])


def read_shard(path) -> np.ndarray:
    path = Path(path)
    header, size = _read_header(path, SHARD_MAGIC, "token shard")
    if header[1] != SHARD_VERSION:
        raise LlmgenError(f"{path}: token shard version {header[1]} is not supported (expected 1)")
    if size - HEADER_BYTES != 2 * int(header[2]):
        raise LlmgenError(f"{path}: token shard header says {header[2]} tokens, "
                          f"file holds {(size - HEADER_BYTES) // 2}")
    return _read_body(path, "<u2", int(header[2]), "token shard")
