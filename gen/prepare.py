"""Text files in, llm.c token shards out (`llmgen data prepare`).

Every input file is one document. Each document is tokenized with GPT-2's BPE and starts
with <|endoftext|>, as in llm.c's data scripts; the documents are concatenated, the first
tokens go to the val split and the rest to train, and each split is cut into shards of at
most `shard_tokens` tokens of about equal size (so no shard is too small for a batch).

Everything is read, checked and tokenized before the first shard is written: a bad input
leaves the output dir as it was. The whole new set (shards, tokenizer file, prepare.json) is
then written into a hidden staging dir inside the output dir, so that a write that fails
(a full disk) leaves the earlier set complete; only then are the files moved into place by
renames, prepare.json removed first and put back last, so that a set interrupted while it is
moved does not look prepared. Files of the user's in the output dir are left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LlmgenError
from .fileio import read_regular, write_atomic, write_shard
from .tokenizer import EOT_TOKEN, RANKS_SHA256, data_file, gpt2, write_c_tokenizer

EMBEDDED = {"shakespeare": "shakespeare.txt"}   # names that mean a corpus shipped with llmgen
CHUNK_CHARS = 1 << 20         # long documents are tokenized in chunks of about this many characters
WHITESPACE_RUN = 1 << 16      # and whitespace runs this long are cut (tiktoken fails on about 1M)
PROGRESS_BYTES = 16 << 20     # show a progress bar from this much input on
VAL_FRACTION = 0.1            # the default split, when neither a fraction nor a count is given
SHARD_TOKENS = 100_000_000    # the default most tokens per shard, as llm.c's FineWeb shards
TOKENIZER_FILE = "gpt2_tokenizer.bin"
MANIFEST_FILE = "prepare.json"


@dataclass(frozen=True)
class Source:
    """One input document: a file, or a corpus embedded in the package."""
    path: Path
    label: str          # how messages name it

    def stat(self) -> list:
        s = self.path.stat()
        return [self.label, s.st_size, s.st_mtime_ns]


def find_sources(inputs: list[str]) -> list[Source]:
    """Files named directly, the files under named folders (sorted, hidden ones skipped),
    and embedded corpora by name (when no file of that name exists)."""
    sources = []
    for name in inputs:
        path = Path(name)
        if not path.exists() and name in EMBEDDED:
            sources.append(Source(data_file(EMBEDDED[name]), f"{name} (embedded)"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise LlmgenError(f"{path}: folder holds no files")
            sources.extend(Source(p, str(p)) for p in files)
        elif path.is_file():
            sources.append(Source(path, str(path)))
        elif path.exists():
            raise LlmgenError(f"{path}: not a file or folder")
        else:
            hint = f" (embedded corpora: {', '.join(EMBEDDED)})" if "/" not in name else ""
            raise LlmgenError(f"{path}: no such file or folder{hint}")
    if not sources:
        raise LlmgenError("no input given")
    return sources


def read_text(source: Source, errors: str = "strict") -> str:
    """The file's text; binary files and (unless errors='replace') invalid UTF-8 are refused."""
    data = read_regular(source.path, "text file")
    nul = data.find(b"\0")
    if nul >= 0:
        raise LlmgenError(f"{source.label}: looks like a binary file (NUL byte at offset {nul}), not text")
    if data.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte order mark is not text
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "replace":
            return data.decode("utf-8", errors="replace")
        raise LlmgenError(f"{source.label}: not UTF-8 text: invalid byte 0x{data[e.start]:02x} at offset {e.start} "
                          "(--encoding-errors replace accepts it as U+FFFD)") from None


def split_chunks(text: str, size: int = CHUNK_CHARS, max_run: int = WHITESPACE_RUN) -> list[str]:
    r"""Cut text into pieces of about `size` characters that tokenize exactly as the whole,
    and cut every whitespace run of at least `max_run` characters (and some shorter ones)
    that is followed by a non-space before its last character.

    GPT-2's pre-tokenizer (tokenizer.PAT_STR) has no lookbehind, so the pieces it finds from
    a piece boundary on do not depend on the text before it; a cut at a piece boundary keeps
    the tokens if the text before the cut also splits as before, as it does at both kinds of
    cut here:

    - right after a newline that follows a non-space character and precedes an ASCII letter
      or digit: the newline is a piece of its own either way, the word after it starts one;
    - right before the last character of a run of two or more whitespace characters (\s)
      followed by a non-space one. In the whole text \s+(?!\S) takes the run less its last
      character (the alternatives before it need a letter, digit or other non-space after an
      optional space, or the end of the text), and the last character starts the next piece
      (alone, or as the space before a word). Cut there, the text before ends in that same
      run, which \s++$ takes whole. tiktoken needs these cuts: for \s+(?!\S) its regex engine
      keeps a backtracking entry per character, and fails ("StackOverflow") on a run of
      about a million.
    """
    segments, start = [], 0
    # a run of max_run or more covers a multiple of max_run: look there only (most positions
    # of a text are never looked at, the runs found are scanned in C)
    at = max_run
    while at < len(text):
        end = _WHITESPACE_RUN.match(text, at).end()
        if at < end < len(text) and (end - at >= 2 or text[at - 1] in WHITESPACE):
            segments.append(text[start:end - 1])
            start = end - 1
        at = (end // max_run + 1) * max_run
    segments.append(text[start:])
    return [piece for segment in segments for piece in _split_at_newlines(segment, size)]


# \s of tiktoken's regex engine (Rust's regex crate): Unicode White_Space. Not str.isspace(),
# which also takes U+001C..U+001F.
WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
              + "\u2028\u2029\u202f\u205f\u3000")
_WHITESPACE_RUN = re.compile(f"[{WHITESPACE}]*")


def _split_at_newlines(text: str, size: int) -> list[str]:
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        while end < len(text) and not (text[end - 1] == "\n" and not text[end - 2].isspace()
                                       and text[end].isascii() and text[end].isalnum()):
            end += 1
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return [p for p in pieces if p]


@dataclass
class Prepared:
    documents: int = 0
    input_bytes: int = 0
    train_tokens: int = 0
    val_tokens: int = 0
    shards: list[Path] = field(default_factory=list)
    tokenize_seconds: float = 0.0
    threads: int = 1

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.val_tokens

    @property
    def rate(self) -> float:
        return self.tokens / self.tokenize_seconds if self.tokenize_seconds > 0 else float("inf")


def _tokenize(sources: list[Source], errors: str, threads: int, progress: bool) -> tuple[list[np.ndarray], int, float]:
    """Per document: [<|endoftext|>, tokens...] as uint16; plus input bytes and seconds spent encoding.

    Chunks of all documents go to tiktoken in batches (several per thread), so that large
    documents and many small ones both keep the threads busy and the progress bar moving."""
    enc = gpt2()
    total_bytes = sum(s.path.stat().st_size for s in sources)
    bar = None
    if progress and total_bytes >= PROGRESS_BYTES:
        import click
        bar = click.progressbar(length=total_bytes, label="tokenizing", file=sys.stderr, show_pos=False)
        bar.__enter__()
    pieces: list[list[list[int]]] = []            # per document, its chunks' tokens
    pending: list[tuple[int, str, float]] = []    # (document, chunk, its share of the input bytes)
    seconds, pending_chars = 0.0, 0

    def encode_pending():
        nonlocal seconds
        t0 = time.perf_counter()
        tokens = enc.encode_ordinary_batch([chunk for _, chunk, _ in pending], num_threads=threads)
        seconds += time.perf_counter() - t0
        for (doc, _, _), ids in zip(pending, tokens):
            pieces[doc].append(ids)
        if bar is not None:
            bar.update(round(sum(b for _, _, b in pending)))
        pending.clear()

    try:
        for source in sources:
            text = read_text(source, errors)
            size = source.path.stat().st_size
            if not text.strip():           # an empty file is no document
                if bar is not None:
                    bar.update(size)
                continue
            pieces.append([])
            for chunk in split_chunks(text):
                pending.append((len(pieces) - 1, chunk, size * len(chunk) / len(text)))
                pending_chars += len(chunk)
                if pending_chars >= 4 * threads * CHUNK_CHARS:
                    encode_pending()
                    pending_chars = 0
        if pending:
            encode_pending()
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    docs = []
    for doc_pieces in pieces:
        doc = np.empty(1 + sum(len(p) for p in doc_pieces), dtype=np.uint16)
        doc[0] = EOT_TOKEN
        np.concatenate([np.asarray(p, dtype=np.uint16) for p in doc_pieces], out=doc[1:])
        docs.append(doc)
    return docs, total_bytes, seconds


def _shards(tokens: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Equal-sized pieces of at most max_tokens each."""
    n = max(1, -(-len(tokens) // max_tokens))
    return np.array_split(tokens, n)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".llmgen-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LlmgenError(f"{out}: cannot write the output dir ({e.strerror})") from None


def prepare(inputs: list[str], out_dir: str | Path, *, val_fraction: float | None = None,
            val_tokens: int | None = None, shard_tokens: int = SHARD_TOKENS, errors: str = "strict",
            threads: int | None = None, progress: bool = True) -> Prepared:
    """Tokenize the inputs into DIR/train_NNNNNN.bin and DIR/val_NNNNNN.bin (llm.c shards),
    and write DIR/gpt2_tokenizer.bin (for the trainer's -T) and DIR/prepare.json."""
    if val_fraction is not None and val_tokens is not None:
        raise LlmgenError("give a val fraction or a val token count, not both")
    if val_fraction is None and val_tokens is None:
        val_fraction = VAL_FRACTION
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise LlmgenError(f"--val-fraction {val_fraction}: must be at least 0 and below 1")
    if val_tokens is not None and val_tokens < 0:
        raise LlmgenError(f"--val-tokens {val_tokens}: must not be negative")
    if not 2 <= shard_tokens:
        raise LlmgenError(f"--shard-tokens {shard_tokens}: a shard needs at least 2 tokens")
    if errors not in ("strict", "replace"):
        raise LlmgenError(f"--encoding-errors {errors}: expected strict or replace")
    threads = threads or min(8, os.cpu_count() or 1)
    out = Path(out_dir)
    sources = find_sources(inputs)
    if out.exists() and not out.is_dir():
        raise LlmgenError(f"{out}: exists and is not a folder")

    docs, total_bytes, seconds = _tokenize(sources, errors, threads, progress)
    if not docs:
        raise LlmgenError(f"no text in {', '.join(s.label for s in sources)}: "
                          f"{'the file is' if len(sources) == 1 else 'all files are'} empty or whitespace")
    tokens = np.concatenate(docs)
    n_val = int(len(tokens) * val_fraction) if val_tokens is None else val_tokens
    n_train = len(tokens) - n_val
    if n_train < 2 or (n_val != 0 and n_val < 2):
        want = f"--val-tokens {val_tokens}" if val_tokens is not None else f"--val-fraction {val_fraction}"
        raise LlmgenError(f"corpus too small for the split: {len(tokens):,} tokens, {want} leaves "
                          f"{max(n_train, 0):,} for train and {n_val:,} for val (each needs at least 2)")

    _check_writable(out)
    result = Prepared(documents=len(docs), input_bytes=total_bytes, train_tokens=n_train, val_tokens=n_val,
                      tokenize_seconds=seconds, threads=threads)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".llmgen-prepare-", dir=out))
    except OSError as e:
        raise LlmgenError(f"{out}: cannot write the output dir ({e.strerror})") from None
    try:
        splits = [("val", tokens[:n_val]), ("train", tokens[n_val:])]
        for split, part in splits:
            if len(part) == 0:
                continue
            for i, shard in enumerate(_shards(part, shard_tokens)):
                name = f"{split}_{i:06d}.bin"
                write_shard(staging / name, shard)
                result.shards.append(out / name)
        write_c_tokenizer(staging / TOKENIZER_FILE)
        manifest = {"inputs": [s.stat() for s in sources], "val_fraction": val_fraction, "val_tokens": val_tokens,
                    "shard_tokens": shard_tokens, "errors": errors, "tokenizer_sha256": RANKS_SHA256,
                    "documents": result.documents, "train_tokens": n_train, "val_tokens_written": n_val,
                    "shards": [p.name for p in result.shards]}
        write_atomic(staging / MANIFEST_FILE, [json.dumps(manifest, indent=1).encode()])
        _move_into_place(staging, out, [p.name for p in result.shards])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _move_into_place(staging: Path, out: Path, shards: list[str]) -> None:
    """Rename the complete new set from staging into out: the old prepare.json goes first and
    the new one comes last, so out never looks prepared with a mix of old and new files."""
    try:
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        for name in shards + [TOKENIZER_FILE]:
            os.replace(staging / name, out / name)
        # shards of an earlier run that this one did not replace would join the trainer's glob
        for stale in sorted(out.glob("train_*.bin")) + sorted(out.glob("val_*.bin")):
            if stale.name not in shards:
                stale.unlink()
        os.replace(staging / MANIFEST_FILE, out / MANIFEST_FILE)
    except OSError as e:
        raise LlmgenError(f"{out}: cannot move the prepared files into place ({e.strerror}); "
                          "the output dir is left unprepared, run data prepare again") from None


def is_prepared(inputs: list[str], out_dir: str | Path, **settings) -> bool:
    """Whether out_dir holds shards prepared from these very inputs (same sizes and times)
    with these settings (prepare's keyword arguments), so that preparing again would write
    the same files."""
    out = Path(out_dir)
    try:
        manifest = json.loads(read_regular(out / MANIFEST_FILE, "manifest"))
        sources = find_sources(inputs)
        same = (isinstance(manifest, dict) and manifest.get("inputs") == [s.stat() for s in sources]
                and manifest.get("tokenizer_sha256") == RANKS_SHA256
                and all(manifest.get(k) == v for k, v in settings.items()))
    except (OSError, ValueError, RecursionError, LlmgenError):  # (a manifest that is no manifest)
        return False
    shards = manifest.get("shards") if same else None
    return isinstance(shards, list) and len(shards) > 0 and all(isinstance(name, str) for name in shards) \
        and all((out / name).is_file() for name in shards) and (out / TOKENIZER_FILE).is_file()
