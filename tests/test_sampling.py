"""The emitted program's sample-only mode: the sampler against the reference, and its text
output (tokenizer file, UTF-8 held back and replaced) against Python's decoding."""

import struct

import numpy as np
import pytest

from conftest import run_trainer
from llmgen import reference, spec as specs
from llmgen.fileio import write_model

SPEC = specs.load("test-tiny")   # vocab 64, <|endoftext|> = 63
EOT = SPEC.vocab_size - 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A test-tiny model with logits far from uniform, so that the greedy choice is clear."""
    params = reference.init_params(SPEC, seed=3)
    params["wte"] *= 40.0
    path = tmp_path_factory.mktemp("sampling") / "model.bin"
    write_model(path, SPEC, params)
    return path, params


def sample_ids(exe, ckpt_path, *flags):
    r = run_trainer(exe, "-e", ckpt_path, "-x", 0, "-v", 0, "-b", 1, "-T", "/nonexistent/tok.bin", *flags, check=False)
    assert r.returncode == 1 and "cannot open the tokenizer file" in r.stderr  # an explicit -T must exist
    r = run_trainer(exe, "-e", ckpt_path, "-x", 0, "-v", 0, "-b", 1, *flags)
    assert r.stdout.endswith("\n") and "model test-tiny" in r.stderr and "model" not in r.stdout
    return [int(x) for x in r.stdout.split()]


def reference_logits(params, tokens, T):
    """The reference's float64 logits for the next token after tokens (the last T at most)."""
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    context = np.asarray(tokens[-T:])[None, :]
    logits, _, _ = reference.forward(SPEC, p64, context)
    return logits[0, -1, :SPEC.vocab_size]


def test_greedy_follows_the_reference(tiny_trainer, ckpt):
    path, params = ckpt
    prompt = [5, 17, 42]
    out = sample_ids(tiny_trainer, path, "-t", 8, "-g", 20, "-R", 0, "-P", ",".join(map(str, prompt)))
    assert out[:3] == prompt and len(out) == 23
    tokens = list(prompt)
    for _ in range(20):            # 23 tokens > T=8: the context window slides
        z = reference_logits(params, tokens, 8)
        top2 = np.sort(z)[-2:]
        assert top2[1] - top2[0] > 1e-3, "the test model's greedy choice must be clear"
        tokens.append(int(np.argmax(z)))
    assert out == tokens
    # top-k 1 at any temperature is greedy too
    assert sample_ids(tiny_trainer, path, "-t", 8, "-g", 20, "-K", 1, "-R", 2.0, "-P", "5,17,42") == tokens


def test_top_k_and_seed(tiny_trainer, ckpt):
    path, params = ckpt
    out = sample_ids(tiny_trainer, path, "-t", 16, "-g", 30, "-K", 3, "-R", 100, "-S", 7)
    assert len(out) == 30  # the default prompt <|endoftext|> is not printed
    assert len(set(out)) > 3  # spread by the temperature, so the cut to the top 3 matters
    tokens = [EOT]
    for t in out:
        z = reference_logits(params, tokens, 16)
        assert z[t] >= np.sort(z)[-3] - 1e-4, "a token outside the top 3"
        tokens.append(t)
    assert sample_ids(tiny_trainer, path, "-t", 16, "-g", 30, "-K", 3, "-R", 100, "-S", 7) == out
    assert sample_ids(tiny_trainer, path, "-t", 16, "-g", 30, "-K", 3, "-R", 100, "-S", 8) != out
    wide = sample_ids(tiny_trainer, path, "-t", 16, "-g", 60, "-R", 100, "-S", 1)
    assert len(set(wide)) > 10  # no top-k: a high temperature spreads over many tokens


# Tokens whose bytes split and break UTF-8 in every way; the rest are plain ASCII words.
TRICKY = [b"A", b"\xe2", b"\x82", b"\xac", b"\xe2\x82", b"\xf0\x9f", b"\xa4\x96", b"\xff", b"\xc0\x80",
          b"\xed\xa0\x80", b"\xe0\x80\x80", b"\xf4\x90\x80\x80", b"\x1b[31m", b"\r", b"\t", b"\n", b"\xc2\x9b",
          b"\x7f", b"caf\xc3", b"\xa9 ok", "日本".encode(), b"\xe6\x97", b"\xa5", b"\x00", " é".encode(),
          b"\xf0\x9f\xa4", b"\x96 done", b"\xc3"]
TOKENS = TRICKY + [f" w{i}".encode() for i in range(len(TRICKY), EOT)] + [b"<|endoftext|>"]


def write_tokenizer(path, tokens, vocab=None, magic=20240328):
    header = [magic, 2, vocab or len(tokens), EOT] + [0] * 252
    path.write_bytes(struct.pack("<256I", *header) + b"".join(bytes([len(t)]) + t for t in tokens))
    return path


def expected_text(data: bytes) -> str:
    """Python's decoding with replacement, and control characters but \\n and \\t replaced too."""
    text = data.decode("utf-8", errors="replace")
    return "".join("\ufffd" if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F else c for c in text)


PROMPTS = [
    [1, 2, 3],              # a euro sign in three tokens
    [4, 3, 0],              # ... in two
    [5, 6],                 # a 4-byte emoji in two
    [1, 0, 2, 0],           # starts cut short by ASCII
    [7, 8, 9, 10, 11],      # 0xff, overlong 2 and 3 bytes, a surrogate, past U+10FFFF
    [12, 13, 14, 15, 16, 17, 23],  # ESC, CR, tab, newline, C1 CSI, DEL, NUL
    [18, 19, 20, 21, 22],   # café ok 日本 and 日 split
    [EOT, 24, 25, 26],      # leading <|endoftext|> not printed; é; emoji in 2 tokens
    [25],                   # cut short at the end
    [27, 1, 2, 3, EOT, 0],  # a lead byte then another lead; <|endoftext|> inside the text
]


def test_utf8_output_matches_python(tiny_trainer, ckpt, tmp_path):
    path, _ = ckpt
    tok = write_tokenizer(tmp_path / "tok.bin", TOKENS)
    for prompt in PROMPTS:
        r = run_trainer(tiny_trainer, "-e", path, "-x", 0, "-v", 0, "-b", 1, "-T", tok, "-g", 0,
                        "-P", ",".join(map(str, prompt)))
        raw = b"".join(TOKENS[t] for t in (prompt[1:] if prompt[0] == EOT else prompt))
        assert r.stdout == expected_text(raw) + "\n", prompt
    # a long random sample through this tokenizer is valid UTF-8 with no control characters
    r = run_trainer(tiny_trainer, "-e", path, "-x", 0, "-v", 0, "-b", 1, "-T", tok, "-g", 300, "-R", 3.0)
    data = r.stdout.encode()
    data.decode("utf-8", errors="strict")
    assert all(ord(c) >= 32 or c in "\n\t" for c in r.stdout)


def test_bad_sampling_input(tiny_trainer, ckpt, tmp_path):
    path, _ = ckpt
    base = ["-e", path, "-x", 0, "-v", 0, "-b", 1]
    cases = [
        (["-x", 0], "-x 0 samples a trained model: give its checkpoint with -e"),
        (base + ["-P", "1,x"], "-P: expected token ids separated by commas, got '1,x'"),
        (base + ["-P", "64"], "-P: token 64 is not in the vocab [0, 64)"),
        (base + ["-K", "-1"], "-K: expected an integer from 0 to 2147483647, got '-1'"),
        (base + ["-T", write_tokenizer(tmp_path / "big.bin", TOKENS * 2)], "the tokenizer has 128 tokens, this model's vocab is 64"),
        (base + ["-T", write_tokenizer(tmp_path / "magic.bin", TOKENS, magic=7)], "not an llm.c tokenizer file (magic 7"),
        (base + ["-T", write_tokenizer(tmp_path / "short.bin", TOKENS[:10], vocab=64)], "short.bin: truncated tokenizer file"),
    ]
    for args, message in cases:
        r = run_trainer(tiny_trainer, *args, check=False)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)


def test_sample_from_a_run_dir(tiny_trainer, tiny_data, tmp_path):
    run = tmp_path / "run"
    run_trainer(tiny_trainer, "-i", tiny_data / "train_*.bin", "-b", 2, "-t", 8, "-x", 2, "-n", 2, "-s", 0, "-o", run)
    log = (run / "main.log").read_text()
    r = run_trainer(tiny_trainer, "-x", 0, "-y", 1, "-o", run, "-v", 0, "-b", 1, "-t", 8, "-g", 5)
    assert len(r.stdout.split()) == 5
    assert (run / "main.log").read_text() == log       # sampling leaves the run's log alone
    empty = run_trainer(tiny_trainer, "-x", 0, "-y", 1, "-o", tmp_path / "none", check=False)
    assert empty.returncode == 1 and "no checkpoint in" in empty.stderr
