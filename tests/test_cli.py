"""The llmgen command line: help everywhere, info figures, clear errors."""

import os
import subprocess
import sys

import pytest

from conftest import llmgen, refused


@pytest.mark.parametrize("command", [[], ["emit"], ["info"], ["verify"], ["bench"], ["presets"], ["train"], ["sample"],
                                     ["data"], ["data", "synthetic"], ["data", "prepare"], ["data", "tokenizer"],
                                     ["import-hf"], ["export-hf"], ["report"]])
def test_help_on_every_command(command):
    result = llmgen(*command, "--help")
    assert result.returncode == 0 and "Usage: " in result.stdout


def test_info_for_gpt2_124m():
    result = llmgen("info", "--spec", "gpt2-124m", "-b", 4, "-t", 64)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "parameters: 124,439,808 (124,475,904 with the padded vocab)" in out
    assert "AdamW m and v" in out and "activations (B=4, T=64)" in out
    # 6 per matmul weight (12 C^2 per layer and the tied classifier Vp C) + 6LC(T+1), at T=64
    L, C, Vp, T = 12, 768, 50304, 64
    assert f"training FLOPs per token: {6 * (L * 12 * C * C + Vp * C) + 6 * L * C * (T + 1):,} at T=64" in out


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


def test_help_lists_commands_in_workflow_order_with_whole_descriptions():
    out = llmgen("--help").stdout
    assert "Start here: llmgen train" in out
    rows = out.split("Commands:")[1].strip("\n").splitlines()
    assert all(line.startswith("  ") and not line.startswith("   ") for line in rows)  # one line each: not wrapped
    commands = [line.split()[0] for line in rows]
    assert commands == ["train", "sample", "data", "emit", "info", "presets", "verify", "bench", "report",
                        "import-hf", "export-hf"]
    assert "..." not in out.split("Commands:")[1]  # short_help: no description is cut


def test_every_option_has_help_and_presets_are_listed_by_size_without_the_test_ones():
    import click
    from llmgen.cli import cli

    def commands(group):
        for cmd in group.commands.values():
            yield from commands(cmd) if isinstance(cmd, click.Group) else [cmd]
    for cmd in commands(cli):
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{cmd.name} {param.opts}"
    spec_help = next(p.help for p in cli.commands["info"].params if p.name == "spec_name")
    by_size = ["gpt2-tiny", "llama-tiny", "llama-124m", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m"]
    assert ", ".join(by_size) in spec_help and "test-" not in spec_help
    listed = llmgen("presets").stdout.splitlines()
    assert [line.split()[0] for line in listed[:7]] == by_size
    assert listed[7] == "for tests:" and {line.split()[0] for line in listed[8:]} == {"test-tiny", "test-odd"}


@pytest.mark.parametrize("args, message", [
    (["info", "--spec", "nope"], "error: 'nope' is neither a preset"),
    (["info", "-b", "0"], "error: Invalid value for '-b': 0 is not in the range x>=1. (see llmgen info --help)"),
    (["emit", "--frobnicate"], "error: No such option '--frobnicate'. (see llmgen emit --help)"),
    (["frobnicate"], "error: No such command 'frobnicate'. (see llmgen --help)"),
])
def test_every_error_is_one_error_line(args, message):
    result = llmgen(*args)
    assert result.returncode == (1 if "neither" in message else 2) and "Traceback" not in result.stderr
    assert result.stderr.replace("python -m llmgen", "llmgen").startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_info_and_bench_count_the_same_flops():
    from llmgen import spec as specs
    from llmgen.bench import flops_per_token as bench_flops
    s = specs.load("gpt2-124m")
    assert bench_flops is specs.flops_per_token
    assert specs.flops_per_token(s, 64)["total"] == 745_003_008


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
