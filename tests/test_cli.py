"""The llmgen command line: help everywhere, info figures, clear errors."""

import pytest

from conftest import llmgen


@pytest.mark.parametrize("command", [[], ["emit"], ["info"], ["verify"], ["bench"], ["presets"], ["train"], ["sample"],
                                     ["data"], ["data", "synthetic"], ["data", "prepare"], ["data", "tokenizer"],
                                     ["import-hf"], ["export-hf"]])
def test_help_on_every_command(command):
    result = llmgen(*command, "--help")
    assert result.returncode == 0 and "Usage: " in result.stdout


def test_info_for_gpt2_124m():
    result = llmgen("info", "--spec", "gpt2-124m", "-b", 4, "-t", 64)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "parameters: 124,439,808 (124,475,904 with the padded vocab)" in out
    assert "AdamW m and v" in out and "activations (B=4, T=64)" in out
    # 6N + 6LCT at T=64
    assert f"{6 * 124_475_904 + 6 * 12 * 768 * 64:,}" in out


def test_info_with_overrides_and_bad_sizes():
    result = llmgen("info", "--spec", "gpt2-124m", "--layers", 6, "--channels", 384, "--heads", 6)
    assert result.returncode == 0 and "6 layers, 6 heads of 64, 384 channels" in result.stdout
    bad = llmgen("info", "--spec", "gpt2-124m", "--heads", 7)
    assert bad.returncode == 1 and "not divisible by heads 7" in bad.stderr
    bad = llmgen("info", "--spec", "test-tiny", "-t", 33)
    assert bad.returncode == 1 and "max_seq_len 32" in bad.stderr


def test_synthetic_data(tmp_path):
    result = llmgen("data", "synthetic", "--spec", "test-odd", "-o", tmp_path, "--tokens", 1000, "--val-tokens", 100)
    assert result.returncode == 0, result.stderr
    from llmgen.fileio import read_shard
    train = read_shard(tmp_path / "train_000000.bin")
    assert train.size == 1000 and train.max() < 97
    assert read_shard(tmp_path / "val_000000.bin").size == 100
