"""The llmgen command line: help everywhere, info figures, clear errors."""

import os
import subprocess
import sys

import pytest

from conftest import llmgen, refused


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


def test_fifos_and_other_non_regular_files_are_refused_not_waited_on(tmp_path):
    """A FIFO would block open() forever: every reader of a user's file refuses it by name."""
    for name in ("spec.toml", "model.bin", "model.safetensors", "text.txt"):
        os.mkfifo(tmp_path / name)
    hf = tmp_path / "hf"
    assert llmgen("export-hf", write_tiny_checkpoint(tmp_path / "tiny.bin"), "-o", hf, timeout=60).returncode == 0
    os.remove(hf / "config.json")
    os.mkfifo(hf / "config.json")
    hf_fifo_model = tmp_path / "hf_fifo_model"
    hf_fifo_model.mkdir()
    os.mkfifo(hf_fifo_model / "model.safetensors")
    cases = [
        (["info", "--spec", tmp_path / "spec.toml"], tmp_path / "spec.toml", "a FIFO"),
        (["info", "--spec", tmp_path], tmp_path, "a folder"),
        (["info", "--spec", "/dev/zero"], "/dev/zero", "a character device"),
        (["info", "--spec-from", tmp_path / "model.bin"], tmp_path / "model.bin", "a FIFO"),
        (["export-hf", tmp_path / "model.bin", "-o", tmp_path / "out"], tmp_path / "model.bin", "a FIFO"),
        (["import-hf", tmp_path / "model.safetensors", "-o", tmp_path / "x.bin"], tmp_path / "model.safetensors",
         "a FIFO"),
        (["import-hf", hf_fifo_model, "-o", tmp_path / "x.bin"], hf_fifo_model / "model.safetensors", "a FIFO"),
        (["import-hf", hf, "-o", tmp_path / "x.bin"], hf / "config.json", "a FIFO"),
        (["data", "prepare", tmp_path / "text.txt", "-o", tmp_path / "data"], tmp_path / "text.txt", ""),
    ]
    for args, path, kind in cases:
        refused(llmgen(*args, timeout=20), f"{path}: ", kind)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.bin").exists()


def test_a_fifo_swapped_in_after_the_check_is_refused_too(tmp_path):
    """open_regular opens without blocking and checks the open file again (fstat)."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "plain").write_text("x")
    code = ("import os, sys; from llmgen import fileio; from llmgen.errors import LlmgenError\n"
            "real = os.stat; fileio.os.stat = lambda p, *a, **k: real(sys.argv[2])  # the check sees a plain file\n"
            "try:\n    fileio.read_regular(sys.argv[1], 'spec file')\nexcept LlmgenError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, tmp_path / "fifo", tmp_path / "plain"], capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 0 and "not a regular file (a FIFO)" in r.stdout, r.stdout + r.stderr


def write_tiny_checkpoint(path):
    from llmgen import reference as ref
    from llmgen import spec as specs
    from llmgen.fileio import write_model
    spec = specs.load("test-tiny")
    write_model(path, spec, ref.init_params(spec))
    return path
