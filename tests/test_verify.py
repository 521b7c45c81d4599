"""llmgen verify: the emitted C against the NumPy reference, on several small and odd specs."""

import pytest

from llmgen import spec as specs
from llmgen.verify import verify

from conftest import llmgen

CASES = [
    ("test-tiny", {}, 2, 16),                                   # powers of two
    ("test-odd", {}, 2, 13),                                    # 3 heads, vocab 97 -> 128, T = 13
    ("test-odd", {"layers": 1, "heads": 5, "channels": 40, "vocab_size": 250, "max_seq_len": 20}, 3, 7),
    ("test-tiny", {"heads": 1, "channels": 24, "layers": 3, "vocab_size": 129}, 1, 32),  # T = max_seq_len
]


@pytest.mark.parametrize("name, overrides, B, T", CASES)
def test_verify_passes(tmp_path, name, overrides, B, T):
    spec = specs.load(name).with_overrides(**overrides)
    rows = verify(spec, B=B, T=T, build_dir=tmp_path)
    assert len(rows) == 2 + 16 + 2 + 16
    bad = [r for r in rows if not r.ok]
    assert not bad, bad


def test_verify_command_prints_table_and_exit_status(tmp_path):
    result = llmgen("verify", "--spec", "test-odd", "-t", 11, "--steps", 3, "--build-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max rel err" in result.stdout and "param wte after 3 steps" in result.stdout
    assert result.stdout.strip().endswith("all 36 within tolerance")


def test_verify_catches_a_wrong_kernel(tmp_path):
    """A dropped digit in the emitted GELU must make verify fail."""
    spec = specs.load("test-tiny")
    from llmgen import verify as v
    original = v.build

    def broken_build(spec, out_dir, cc="gcc"):
        original(spec, out_dir, cc)
        src = out_dir / "train_gpt2.c"
        src.write_text(src.read_text().replace("0.044715f * x * x * x", "0.04715f * x * x * x"))
        return v.make(out_dir, "test_gpt2", cc)  # the edited source is newer: make rebuilds

    v.build = broken_build
    try:
        rows = verify(spec, B=2, T=8, steps=2, build_dir=tmp_path)
    finally:
        v.build = original
    assert not all(r.ok for r in rows)
    assert not next(r for r in rows if r.name == "logits").ok
