"""The offline GPT-2 tokenizer: tiktoken's gpt2 ids, checked against an independent BPE."""

import hashlib

import pytest
import regex

from llmgen import tokenizer as tok
from llmgen.errors import LlmgenError
from llmgen.prepare import split_chunks

STRINGS = [
    "",
    "Hello world",
    "Hello, world! It's a test: don't, won't, we'll, they've, I'm, you're, he'd.",
    "  leading and trailing spaces  ",
    "a  b   c    d\t\te\n\n\nf \n \n g\r\n h\u00a0i",
    "\n\n\n",
    "   ",
    "numbers 1234567890 3.14159 -42 1e10 ১২৩ ٤٥٦",
    "héllo wörld, naïve café, Ångström, Straße",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "Ελληνικά Русский текст עברית العربية हिन्दी",
    "emoji 🤖👍🏽 👨‍👩‍👧‍👦 🇫🇷 flags",
    "combining e\u0301 a\u0308 zero\u200bwidth",
    "code: def f(x):\n    return x**2  # comment\n",
    "<|endoftext|> inside text is just text",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "\x00\x01\x7f control \x1b[31m escapes",
]


def reference_bpe(text: str, ranks: dict[bytes, int]) -> list[int]:
    """GPT-2's byte-level BPE written out plainly: split with the pre-tokenizer pattern,
    then in each piece merge the adjacent pair of lowest rank until none is left."""
    ids = []
    for piece in regex.findall(tok.PAT_STR, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            pairs = [(r, i) for r, i in pairs if r is not None]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


@pytest.fixture(scope="module")
def ranks():
    return tok.load_ranks()


def test_encoding_is_gpt2():
    enc = tok.gpt2()
    assert (enc.name, enc.n_vocab, enc.eot_token) == ("gpt2", 50257, 50256)
    assert enc.max_token_value == 50256
    # the same pattern and special token as tiktoken's own gpt2 definition
    from tiktoken_ext.openai_public import r50k_pat_str
    assert tok.PAT_STR == r50k_pat_str
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_known_ids():
    enc = tok.gpt2()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("") == []
    assert enc.decode_single_token_bytes(50256) == b"<|endoftext|>"


@pytest.mark.parametrize("text", STRINGS)
def test_ids_equal_a_plain_bpe(text, ranks):
    enc = tok.gpt2()
    ids = enc.encode_ordinary(text)
    assert ids == reference_bpe(text, ranks)
    assert enc.decode(ids) == text
    assert all(0 <= i < 50256 for i in ids)


def test_special_token():
    enc = tok.gpt2()
    # as text it is ordinary characters; only when allowed is it the one special id
    assert 50256 not in enc.encode_ordinary("<|endoftext|>")
    assert enc.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")  # tiktoken refuses a special token it was not told to allow


def test_chunked_encoding_equals_whole():
    enc = tok.gpt2()
    text = tok.data_file("shakespeare.txt").read_text()[:300_000]
    text += "\n\nword\n\n\n  Indented\nLast line\n"
    pieces = split_chunks(text, size=5_000)
    assert len(pieces) > 50 and "".join(pieces) == text
    chunked = [i for ids in enc.encode_ordinary_batch(pieces, num_threads=2) for i in ids]
    assert chunked == enc.encode_ordinary(text)


def test_ranks_hash_is_checked(tmp_path):
    data = tok.data_file("gpt2.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == tok.RANKS_SHA256
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(data[:-10] + b"0000000000")
    with pytest.raises(LlmgenError, match="gpt2.tiktoken: sha256 .* is not that of GPT-2's BPE ranks"):
        tok.load_ranks(bad)


def test_c_tokenizer_file(tmp_path):
    path = tok.write_c_tokenizer(tmp_path / "gpt2_tokenizer.bin")
    raw = path.read_bytes()
    assert list(memoryview(raw[:16]).cast("I")) == [20240328, 2, 50257, 50256]
    eot, tokens = tok.read_c_tokenizer(path)
    enc = tok.gpt2()
    assert eot == 50256 and len(tokens) == 50257
    assert tokens == [enc.decode_single_token_bytes(i) for i in range(50257)]
    path.write_bytes(raw[:-5])
    with pytest.raises(LlmgenError, match="truncated tokenizer file"):
        tok.read_c_tokenizer(path)
