"""`llmgen data prepare`: text to shards and back, and every kind of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import llmgen, refused
from llmgen.errors import LlmgenError
from llmgen.fileio import read_shard
from llmgen.prepare import prepare, split_chunks
from llmgen.tokenizer import EOT_TOKEN, gpt2, read_c_tokenizer

DOCS = {
    "a.txt": "First document.\nIt has two lines.\n",
    "b.txt": "Second: unicode héllo 日本語 🤖, and  runs   of\t\tspace.\n\n\n",
    "sub/c.md": "Third, in a subfolder.\n" * 40,
}


def write_docs(root):
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / ".hidden").write_text("not a document")
    return root


def read_back(out):
    """All tokens, val shards first (the order prepare cuts them in), split into documents."""
    tokens = np.concatenate([read_shard(p) for p in sorted(out.glob("val_*.bin")) + sorted(out.glob("train_*.bin"))])
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    assert starts[0] == 0
    return [gpt2().decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, list(starts[1:]) + [len(tokens)])]


def test_round_trip_folder(tmp_path):
    src = write_docs(tmp_path / "corpus")
    out = tmp_path / "out"
    r = prepare([str(src)], out, val_tokens=10, progress=False)
    assert r.documents == 3 and r.val_tokens == 10
    # documents come back in sorted path order, each exactly as written
    assert read_back(out) == [DOCS["a.txt"], DOCS["b.txt"], DOCS["sub/c.md"]]
    assert sorted(p.name for p in out.iterdir()) == ["gpt2_tokenizer.bin", "prepare.json",
                                                    "train_000000.bin", "val_000000.bin"]
    assert len(read_shard(out / "val_000000.bin")) == 10
    assert read_c_tokenizer(out / "gpt2_tokenizer.bin")[0] == EOT_TOKEN
    assert json.loads((out / "prepare.json").read_text())["documents"] == 3


def test_shard_size_and_stale_shards(tmp_path):
    src = write_docs(tmp_path / "corpus")
    out = tmp_path / "out"
    prepare([str(src)], out, val_fraction=0.25, shard_tokens=50, progress=False)
    train = sorted(out.glob("train_*.bin"))
    sizes = [len(read_shard(p)) for p in train]
    assert len(train) > 3 and max(sizes) <= 50 and max(sizes) - min(sizes) <= 1  # equal shards, none tiny
    assert read_back(out) == [DOCS["a.txt"], DOCS["b.txt"], DOCS["sub/c.md"]]
    # fewer, larger shards the second time: the old ones must not linger for the trainer's glob
    prepare([str(src)], out, val_fraction=0.25, progress=False)
    assert [p.name for p in sorted(out.glob("train_*.bin"))] == ["train_000000.bin"]
    assert read_back(out) == [DOCS["a.txt"], DOCS["b.txt"], DOCS["sub/c.md"]]


def test_no_val_split(tmp_path):
    (tmp_path / "t.txt").write_text("just some text to train on\n" * 5)
    prepare([str(tmp_path / "t.txt")], tmp_path / "out", val_fraction=0.0, progress=False)
    assert not list((tmp_path / "out").glob("val_*.bin"))


def test_cli_embedded_shakespeare(tmp_path):
    r = llmgen("data", "prepare", "shakespeare", "-o", tmp_path / "d", "--val-tokens", "32768")
    assert r.returncode == 0, r.stderr
    assert "1 document, 1.3 MiB of text: 428,714 tokens (395,946 train, 32,768 val) in 2 shards" in r.stdout
    assert "M tokens/s" in r.stdout
    text = read_back(tmp_path / "d")
    from llmgen.tokenizer import data_file
    assert text == [data_file("shakespeare.txt").read_text()]


def test_cli_replace_encoding_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    r = llmgen("data", "prepare", bad, "-o", tmp_path / "out", "--encoding-errors", "replace", "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert read_back(tmp_path / "out") == ["caf\ufffd au lait\n"]


def bad_input_cases(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"ok so far\ncaf\xe9\n")
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    afile = tmp_path / "afile"
    afile.write_text("x")
    good = tmp_path / "good.txt"
    good.write_text("some good text\n" * 10)
    return [
        ([tmp_path / "missing.txt"], [], "missing.txt: no such file or folder"),
        ([empty], [], "no text in"),
        ([binary], [], "image.png: looks like a binary file (NUL byte at offset 8), not text"),
        ([latin], [], "latin1.txt: not UTF-8 text: invalid byte 0xe9 at offset 13"),
        ([small], ["--val-fraction", "0.5"], "corpus too small for the split"),
        ([good], ["--val-tokens", "100000"], "corpus too small for the split"),
        ([good], ["--val-fraction", "1.5"], "Invalid value for '--val-fraction': 1.5 is not in the range 0<=x<1"),
        ([good], ["--val-fraction", "0.1", "--val-tokens", "5"], "not both"),
        ([good], ["--shard-tokens", "1"], "--shard-tokens 1"),
        ([good], ["-o", afile], "afile: exists and is not a folder"),
        ([good], ["-o", afile / "sub"], "cannot write the output dir"),
    ]


def test_cli_bad_input(tmp_path):
    for inputs, flags, message in bad_input_cases(tmp_path):
        out = tmp_path / "out"
        args = ["data", "prepare", *inputs] + (flags if "-o" in flags else ["-o", out, *flags])
        r = llmgen(*args)
        assert r.returncode == (2 if "Invalid value" in message else 1), (args, r.stdout, r.stderr)
        assert message in r.stderr, (message, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists() or not any(out.iterdir()), f"{args} left files behind"


def test_bad_input_leaves_earlier_output_alone(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("good text\n" * 50)
    out = tmp_path / "out"
    prepare([str(good)], out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    r = llmgen("data", "prepare", good, bad, "-o", out)
    assert r.returncode == 1 and "bad.txt: not UTF-8 text" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_progress_bar_on_large_input(tmp_path, monkeypatch, capsys):
    import llmgen.prepare as prep
    monkeypatch.setattr(prep, "PROGRESS_BYTES", 1000)   # "large" for the test
    (tmp_path / "t.txt").write_text("Some line of text here.\n" * 400)
    prep.prepare([str(tmp_path / "t.txt")], tmp_path / "out", progress=True)
    assert "tokenizing" in capsys.readouterr().err
    (tmp_path / "small.txt").write_text("small\n" * 10)
    prep.prepare([str(tmp_path / "small.txt")], tmp_path / "out2", progress=True)
    assert capsys.readouterr().err == ""


def test_fifo_inputs_do_not_block(tmp_path):
    """A FIFO named as an input is refused; one inside an input folder is no document (skipped)."""
    src = write_docs(tmp_path / "corpus")
    os.mkfifo(src / "pipe.txt")
    r = llmgen("data", "prepare", src, "-o", tmp_path / "out", "--val-tokens", 10, timeout=20)
    assert r.returncode == 0, r.stderr
    assert read_back(tmp_path / "out") == [DOCS["a.txt"], DOCS["b.txt"], DOCS["sub/c.md"]]
    refused(llmgen("data", "prepare", src / "pipe.txt", "-o", tmp_path / "out2", timeout=20), "pipe.txt: ")
    assert not (tmp_path / "out2").exists()


def failing_nth_write(monkeypatch, n):
    """Make the n-th file write (1-based) of llmgen fail half way with a full disk."""
    import errno
    import llmgen.fileio as fileio
    import llmgen.prepare as prep
    import llmgen.tokenizer as tok
    real, calls = fileio.write_atomic, []

    def write_atomic(path, chunks):
        calls.append(path)
        if len(calls) != n:
            return real(path, chunks)

        def half_then_full():
            yield b"some bytes first"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, half_then_full())
    for module in (fileio, prep, tok):  # the shards, prepare.json, the tokenizer file
        monkeypatch.setattr(module, "write_atomic", write_atomic)
    return calls


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


def prepared_old_corpus(tmp_path):
    """An old corpus prepared into out (with a file of the user's beside its shards), and a
    new corpus to prepare over it: (old, new, out)."""
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text("the old corpus, prepared first\n" * 40)
    new.write_text("a different, newer corpus of text\n" * 60)
    out = tmp_path / "out"
    prepare([str(old)], out, val_fraction=0.25, shard_tokens=100, progress=False)
    (out / "notes.txt").write_text("the user's own file")
    return old, new, out


@pytest.mark.parametrize("fail_at", [1, 2, 3, "tokenizer", "manifest"])
def test_a_prepare_that_fails_while_writing_leaves_the_old_set_whole(tmp_path, monkeypatch, fail_at):
    from llmgen.prepare import is_prepared
    old, new, out = prepared_old_corpus(tmp_path)
    before = snapshot(out)
    n_new = len(prepare([str(new)], tmp_path / "probe", val_fraction=0.25, shard_tokens=100, progress=False).shards)
    assert n_new > 3
    n = {"tokenizer": n_new + 1, "manifest": n_new + 2}.get(fail_at, fail_at)
    calls = failing_nth_write(monkeypatch, n)
    with pytest.raises(LlmgenError, match="No space left on device"):
        prepare([str(new)], out, val_fraction=0.25, shard_tokens=100, progress=False)
    assert len(calls) == n
    if fail_at in ("tokenizer", "manifest"):
        assert calls[-1].name == {"tokenizer": "gpt2_tokenizer.bin", "manifest": "prepare.json"}[fail_at]
    assert snapshot(out) == before                    # the old set, whole; no staging dir left behind
    assert is_prepared([str(old)], out, val_fraction=0.25, shard_tokens=100)
    assert not is_prepared([str(new)], out, val_fraction=0.25, shard_tokens=100)


def test_a_prepare_interrupted_while_moving_files_in_does_not_look_prepared(tmp_path, monkeypatch):
    import llmgen.prepare as prep
    old, new, out = prepared_old_corpus(tmp_path)
    real, moved = os.replace, []

    def replace(src, dst):
        if ".llmgen-prepare-" in str(src) and ".llmgen-prepare-" not in str(dst):  # staging -> out
            moved.append(dst)
            if len(moved) == 2:
                raise OSError(5, os.strerror(5))
        return real(src, dst)
    monkeypatch.setattr(prep.os, "replace", replace)
    with pytest.raises(LlmgenError, match="cannot move the prepared files into place"):
        prepare([str(new)], out, val_fraction=0.25, shard_tokens=100, progress=False)
    monkeypatch.undo()
    assert not prep.is_prepared([str(old)], out, val_fraction=0.25, shard_tokens=100)
    assert not prep.is_prepared([str(new)], out, val_fraction=0.25, shard_tokens=100)
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # and preparing again mends it
    prepare([str(new)], out, val_fraction=0.25, shard_tokens=100, progress=False)
    assert prep.is_prepared([str(new)], out, val_fraction=0.25, shard_tokens=100)
    assert read_back(out) == [new.read_text()] and (out / "notes.txt").exists()


# ---- long whitespace runs ----------------------------------------------------------------
WHITE = [" ", "\n", "\t", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2003", "\u3000", "\u2028"]
AFTER = ["word", "Word", "42", "!?", "'s", "'ll", "日本", "🤖", "\x1cnot space", "\u200bzero width", "\u00e9t\u00e9"]


def whitespace_heavy_strings():
    rng = np.random.default_rng(7)
    yield "a" + " " * 5000 + "b"
    yield "x" + "\n" * 5000 + "y"
    yield "first line\n" + "\n" * 5000 + "Next paragraph."
    yield "mixed" + "".join(rng.choice([" ", "\t", "\n"], 5000)) + "words after, and more"
    yield " " * 5000 + "starts with spaces and ends with them" + " " * 5000
    yield "\t" * 3000 + " " + "x" + "\n \n" * 1000 + " y" + "\r\n" * 2000 + "z"
    for w in WHITE:
        for after in AFTER:
            yield f"before{w * 2500}{after}, then {w}{w}{after} and {w}{after}{w * 3}"
    # random mixtures of runs and the characters around them
    alphabet = WHITE + ["\x1c", "\x1f", "\u200b", "\u180e", "\ufeff", "a", "Z", "é", "7", "!", "'", "s", "日", "🤖"]
    for _ in range(300):
        yield "".join(rng.choice(alphabet, rng.integers(1, 60)))


def test_whitespace_runs_are_cut_without_changing_the_tokens():
    """Cutting before the last character of every whitespace run (max_run=2, so every run
    of two or more gets cut) tokenizes exactly as the whole text does."""
    enc = gpt2()
    cut = 0
    for text in whitespace_heavy_strings():
        whole = enc.encode_ordinary(text)
        for max_run, size in [(2, 1 << 20), (2, 7), (3, 1 << 20), (5, 11), (100, 1 << 20), (4999, 1 << 20),
                              (5000, 1000)]:
            pieces = split_chunks(text, size=size, max_run=max_run)
            assert "".join(pieces) == text
            assert [i for p in pieces for i in enc.encode_ordinary(p)] == whole, (text[:40], max_run, size)
            cut += len(pieces) - 1
    assert cut > 1000


def test_whitespace_is_what_tiktoken_takes_for_whitespace():
    """split_chunks' WHITESPACE is exactly tiktoken's \\s, among every character Python calls
    a space and some that are not: tiktoken fails on a run of a million of just those."""
    from llmgen.prepare import WHITESPACE
    enc = gpt2()
    candidates = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()] + ["\u200b", "\u180e", "\ufeff"]
    for c in candidates:
        text = "a" + c * 1_100_000 + "b"
        try:
            enc.encode_ordinary(text)
            fails = False
        except BaseException:  # tiktoken's Rust panic (pyo3_runtime.PanicException)
            fails = True
        mine = c in WHITESPACE
        assert mine == fails, (hex(ord(c)), mine, fails)
    assert "\x1c" not in WHITESPACE


@pytest.mark.parametrize("run", [" ", "\n", " \t\n"])
def test_cli_a_million_whitespace_characters(tmp_path, run):
    text = "start" + (run * 1_000_000)[:1_000_000] + "end\n"
    (tmp_path / "ws.txt").write_text(text)
    r = llmgen("data", "prepare", tmp_path / "ws.txt", "-o", tmp_path / "out", "--val-fraction", "0", timeout=120)
    assert r.returncode == 0, r.stderr
    tokens = read_shard(tmp_path / "out" / "train_000000.bin")
    assert gpt2().decode(tokens[1:].tolist()) == text
    if run == " ":  # GPT-2 has no token for two spaces: the run less its last space is 220s
        enc = gpt2()
        assert tokens.tolist() == [EOT_TOKEN] + enc.encode_ordinary("start") + [220] * 999_999 + \
            enc.encode_ordinary(" end\n")


def test_a_manifest_that_is_no_manifest_means_not_prepared(tmp_path):
    """Whatever prepare.json holds (or is), is_prepared answers False, without an exception or
    a wait: llmgen train then prepares again."""
    from llmgen.prepare import is_prepared
    (tmp_path / "t.txt").write_text("some text to prepare\n" * 20)
    out = tmp_path / "out"
    prepare([str(tmp_path / "t.txt")], out, progress=False)
    assert is_prepared([str(tmp_path / "t.txt")], out)
    good = json.loads((out / "prepare.json").read_text())
    for text in ["[]", "5", "null", '"x"', "[" * 100_000 + "]" * 100_000, "\xff", json.dumps(dict(good, shards=5)),
                 json.dumps(dict(good, shards=[1, 2])), json.dumps(dict(good, shards=[])),
                 json.dumps(dict(good, shards=None)), json.dumps(dict(good, inputs={"a": 1}))]:
        (out / "prepare.json").write_text(text)
        assert not is_prepared([str(tmp_path / "t.txt")], out), text[:40]
    (out / "prepare.json").unlink()
    os.mkfifo(out / "prepare.json")
    code = "import sys; from llmgen.prepare import is_prepared; print(is_prepared([sys.argv[1]], sys.argv[2]))"
    r = subprocess.run([sys.executable, "-c", code, tmp_path / "t.txt", out], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
