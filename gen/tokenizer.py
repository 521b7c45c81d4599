"""GPT-2's byte-level BPE tokenizer, offline, and llm.c's tokenizer file for the C program.

The ranks ship with the package (data/gpt2.tiktoken, the file tiktoken downloads for its
`gpt2` / `r50k_base` encodings) and are checked against their sha256 before use, so the
tokenizer needs no network and gives the same ids as tiktoken.get_encoding("gpt2").

Tokenizer file (llm.c's format, read by the emitted program's -T flag): 256 uint32 header
[magic 20240328, version 2, vocab size, eot token, 0...], then per token one length byte
and that many bytes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
from importlib import resources
from pathlib import Path

from .errors import LlmgenError
from .fileio import write_atomic

RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k_base / gpt2 pre-tokenizer pattern (tiktoken_ext.openai_public.r50k_pat_str)
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
EOT_TOKEN = 50256
VOCAB_SIZE = 50257

TOKENIZER_MAGIC, TOKENIZER_VERSION = 20240328, 2


def data_file(name: str) -> Path:
    """A file shipped in the package's data folder."""
    return Path(str(resources.files("llmgen") / "data" / name))


def load_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """GPT-2's mergeable ranks (token bytes -> id), checked against their known hash."""
    path = Path(path) if path else data_file("gpt2.tiktoken")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LlmgenError(f"{path}: cannot read GPT-2's BPE ranks ({e.strerror}); reinstall llmgen") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise LlmgenError(f"{path}: sha256 {digest} is not that of GPT-2's BPE ranks ({RANKS_SHA256}); "
                          "the file is corrupt, reinstall llmgen")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def gpt2():
    """tiktoken's `gpt2` Encoding, built from the packaged ranks (no network)."""
    import tiktoken
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=load_ranks(),
                             special_tokens={ENDOFTEXT: EOT_TOKEN}, explicit_n_vocab=VOCAB_SIZE)


def token_bytes(enc=None) -> list[bytes]:
    """The bytes of every token id, in id order (the special token as its text)."""
    enc = enc or gpt2()
    return [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]


def write_c_tokenizer(path: str | Path, enc=None) -> Path:
    """Write llm.c's tokenizer file (version 2) for the emitted program's -T flag."""
    enc = enc or gpt2()
    header = [0] * 256
    header[:4] = [TOKENIZER_MAGIC, TOKENIZER_VERSION, enc.n_vocab, enc.eot_token]
    chunks = [struct.pack("<256I", *header)]
    for i, b in enumerate(token_bytes(enc)):
        if not 0 < len(b) < 256:
            raise ValueError(f"token {i} has {len(b)} bytes: the format holds 1 to 255")
        chunks.append(bytes([len(b)]) + b)
    write_atomic(path, chunks)
    return Path(path)


def read_c_tokenizer(path: str | Path) -> tuple[int, list[bytes]]:
    """(eot token, token bytes) from a tokenizer file; for tests and checks."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LlmgenError(f"{path}: cannot read the tokenizer file ({e.strerror})") from None
    if len(data) < 1024:
        raise LlmgenError(f"{path}: truncated tokenizer file ({len(data)} bytes, shorter than its header)")
    header = struct.unpack("<256I", data[:1024])
    if header[0] != TOKENIZER_MAGIC or header[1] != TOKENIZER_VERSION:
        raise LlmgenError(f"{path}: not an llm.c tokenizer file, version 2 (magic {header[0]}, version {header[1]})")
    tokens, at = [], 1024
    for i in range(header[2]):
        if at >= len(data) or at + 1 + data[at] > len(data):
            raise LlmgenError(f"{path}: truncated tokenizer file at token {i} of {header[2]}")
        n = data[at]
        tokens.append(data[at + 1:at + 1 + n])
        at += 1 + n
    if at != len(data):
        raise LlmgenError(f"{path}: {len(data) - at} bytes after the last token")
    return header[3], tokens
