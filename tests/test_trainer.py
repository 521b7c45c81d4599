"""The emitted C trainer run as a user runs it: training, flags, checkpoints, resume, bad input."""

import math
import os
import shutil

import numpy as np

from llmgen import spec as specs
from llmgen.fileio import model_header, read_model, write_model, write_shard
from llmgen.reference import init_params

from llmgen import trainer_output

from conftest import random_tokens, run_trainer, step_losses

COMMON = ["-b", 4, "-t", 16, "-v", 1000, "-s", 0, "-l", 3e-3]


def data_args(d):
    return ["-i", d / "train_*.bin", "-j", d / "val_*.bin"]


def test_loss_falls_on_learnable_data(tiny_trainer, tiny_data, tmp_path):
    result = run_trainer(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 60, "-v", 30, "-o", tmp_path)
    losses = step_losses(result.stdout)
    assert sorted(losses) == list(range(1, 61))
    assert abs(losses[1] - math.log(64)) < 0.3          # random init: about ln(V)
    assert np.mean([losses[s] for s in range(51, 61)]) < losses[1] - 1.0
    line = next(line for line in result.stdout.splitlines() if line.startswith("step 1/60"))
    fields = [f.strip().split()[-1] for f in line.split("|")]
    assert [f.strip().split()[0] for f in line.split("|")][:4] == ["step", "loss", "lr", "norm"]
    assert fields[4:] == ["ms", "tok/s"]
    val = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("val loss")]
    assert len(val) == 3 and val[-1] < val[0] - 1.0
    log = (tmp_path / "main.log").read_text().splitlines()
    assert log[0].startswith("s:0 tel:") and sum(line.startswith("s:") and "trl:" in line for line in log) == 60


def test_help_and_bad_flags(tiny_trainer):
    result = run_trainer(tiny_trainer, "-h")
    for flag in "-i -j -e -o -b -t -d -l -u -q -c -x -v -m -s -g -n -y -a -G -S -T -P -K -R -h".split():
        assert f"  {flag} " in result.stdout
    for args, message in [(["-b", "x"], "-b: expected an integer"), (["-Z", "1"], "unknown flag -Z"),
                          (["-b"], "-b needs a value"), (["-b", "0"], "-b: expected an integer from 1 to 2147483647, got '0'")]:
        bad = run_trainer(tiny_trainer, *args, check=False)
        assert bad.returncode != 0 and message in bad.stderr


def test_default_sequence_length_fits_in_memory(tiny_trainer, tiny_data):
    """-t defaults to 64 (llm.c's CPU trainer's), or max_seq_len if that is smaller; never the
    whole 1024 context of GPT-2, whose activations for B=4 would need about 18 GB."""
    from llmgen.emit import render
    assert '"  -h          this help\\n", MAX_SEQ_LEN, 64);' in render(specs.load("gpt2-124m"))["train_gpt2.c"]
    assert "at most 32 (default 32)" in run_trainer(tiny_trainer, "-h").stdout  # test-tiny: max_seq_len 32
    result = run_trainer(tiny_trainer, *data_args(tiny_data), "-x", 1, "-v", 0, "-s", 0)
    assert "batches of B=4 x T=32" in result.stdout


def test_sampling_prints_token_ids(tiny_trainer, tiny_data):
    result = run_trainer(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 2, "-s", 1, "-g", 40)
    samples = trainer_output.samples(result.stdout)
    assert len(samples) == 2  # at step 1 and the last step
    ids = [int(x) for x in samples[0].split()]
    assert len(ids) == 40 and all(0 <= i < 64 for i in ids)  # 40 > T=16: the context slides


def test_accumulation_equals_one_big_batch(tiny_trainer, tiny_data):
    # 2 micro-batches of B=2 see the same sequences as one batch of B=4
    small = run_trainer(tiny_trainer, *data_args(tiny_data), *COMMON, "-b", 2, "-d", 64, "-x", 5)
    big = run_trainer(tiny_trainer, *data_args(tiny_data), *COMMON, "-b", 4, "-d", 64, "-x", 5)
    a, b = step_losses(small.stdout), step_losses(big.stdout)
    assert "total batch 64 tokens in 2 micro-batches" in small.stdout
    assert all(abs(a[s] - b[s]) < 1e-4 for s in range(1, 6)), (a, b)
    bad = run_trainer(tiny_trainer, *data_args(tiny_data), *COMMON, "-d", 100, check=False)
    assert bad.returncode == 1 and "not a positive multiple of B*T = 64" in bad.stderr


def test_gradient_clipping_flag(tiny_trainer, tiny_data):
    def run(clip):
        return run_trainer(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 3, "-G", clip).stdout
    off, huge, tight = run(0), run(1e9), run(0.01)
    assert step_losses(off) == step_losses(huge)           # never reached: no change
    assert step_losses(tight)[1] == step_losses(off)[1]    # clipping acts on the update
    assert step_losses(tight)[2] != step_losses(off)[2]


def test_overfit_single_batch(tiny_trainer, tmp_path):
    write_shard(tmp_path / "noise.bin", random_tokens(5000, 64))  # nothing to learn across batches
    result = run_trainer(tiny_trainer, "-i", tmp_path / "noise.bin", "-j", tmp_path / "noise.bin",
                         *COMMON, "-x", 40, "-a", 1)
    losses = step_losses(result.stdout)
    assert losses[40] < 1.0 < losses[1]


def test_resume_gives_the_same_losses(tiny_trainer, tiny_data, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = [*data_args(tiny_data), *COMMON, "-x", 8, "-n", 4, "-u", 2, "-q", 0.1, "-c", 0.1]
    straight = run_trainer(tiny_trainer, *args, "-o", full)
    assert sorted(os.listdir(full)) == ["DONE_00000004", "DONE_00000008", "main.log", "model_00000004.bin",
                                        "model_00000008.bin", "state_00000004_00000.bin", "state_00000008_00000.bin"]
    # a run that stopped after its step-4 checkpoint
    part.mkdir()
    for name in ["DONE_00000004", "model_00000004.bin", "state_00000004_00000.bin", "main.log"]:
        shutil.copy(full / name, part / name)
    resumed = run_trainer(tiny_trainer, *args, "-o", part, "-y", 1)
    assert "resuming from step 4" in resumed.stdout
    a, b = step_losses(straight.stdout), step_losses(resumed.stdout)
    assert sorted(b) == [5, 6, 7, 8]
    assert all(a[s] == b[s] for s in b), (a, b)
    assert (full / "model_00000008.bin").read_bytes() == (part / "model_00000008.bin").read_bytes()
    # resuming with no checkpoint starts from scratch
    fresh = run_trainer(tiny_trainer, *args, "-x", 2, "-n", 0, "-o", tmp_path / "empty", "-y", 1)
    assert "no checkpoint" in fresh.stdout and sorted(step_losses(fresh.stdout)) == [1, 2]


def test_checkpoint_round_trips_through_python(tiny_trainer, tiny_data, tmp_path):
    run_trainer(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 2, "-n", 2, "-o", tmp_path)
    spec, params = read_model(tmp_path / "model_00000002.bin")
    assert spec == specs.load("test-tiny")
    # start from it with -e: the first loss equals that model's loss on the first batch
    write_model(tmp_path / "copy.bin", spec, params)
    result = run_trainer(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 1, "-e", tmp_path / "copy.bin")
    assert step_losses(result.stdout)[1] < math.log(64)


def bad_run(exe, *args):
    result = run_trainer(exe, *args, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_bad_data_files(tiny_trainer, tiny_data, tmp_path):
    val = ["-j", tiny_data / "val_*.bin"]
    assert "no token shard matches" in bad_run(tiny_trainer, "-i", tmp_path / "missing_*.bin", *val, *COMMON)
    good = tmp_path / "good.bin"
    write_shard(good, random_tokens(1000, 64))
    data = good.read_bytes()
    cases = {
        "truncated.bin": (data[:1024 + 500], "header says 1000 tokens but the file holds 250"),
        "short.bin": (data[:100], "truncated token shard"),
        "magic.bin": (b"\x00" * 4 + data[4:], "not an llm.c token shard"),
        "version.bin": (data[:4] + (7).to_bytes(4, "little") + data[8:], "token shard version 7"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert message in bad_run(tiny_trainer, "-i", tmp_path / name, *val, *COMMON), name
    write_shard(tmp_path / "big_token.bin", [1, 2, 3, 64, 5] * 100)
    err = bad_run(tiny_trainer, "-i", tmp_path / "big_token.bin", *val, *COMMON)
    assert "token 64 at position 3 is not below the vocab size 64" in err and "big_token.bin" in err
    write_shard(tmp_path / "small.bin", random_tokens(50, 64))
    assert "holds 50 tokens, but one batch needs B*T+1 = 65" in bad_run(
        tiny_trainer, "-i", tmp_path / "small.bin", *val, *COMMON)
    assert "no token shard matches" in bad_run(tiny_trainer, "-i", good, "-j", tmp_path / "nope.bin", *COMMON)


def test_sequence_length_and_output_dir(tiny_trainer, tiny_data, tmp_path):
    args = [*data_args(tiny_data), *COMMON]
    assert "between 1 and max_seq_len 32, got 33" in bad_run(tiny_trainer, *args, "-t", 33)
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    assert "cannot" in bad_run(tiny_trainer, *args, "-o", blocker / "out")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "cannot write to the output dir" in bad_run(tiny_trainer, *args, "-o", ro)
    assert "checkpoints need an output dir" in bad_run(tiny_trainer, *args, "-n", 2)


def test_bad_checkpoints(tiny_trainer, tiny_data, tmp_path):
    args = [*data_args(tiny_data), *COMMON, "-x", 1]
    tiny = specs.load("test-tiny")
    good = tmp_path / "good.bin"
    write_model(good, tiny, init_params(tiny))
    data = good.read_bytes()
    cases = {
        "missing.bin": (None, "cannot open model checkpoint"),
        "truncated.bin": (data[:-8], "expected"),
        "short.bin": (data[:64], "truncated model checkpoint"),
        "magic.bin": (b"\x01" * 4 + data[4:], "not an llm.c model checkpoint"),
        "version.bin": (data[:4] + (4).to_bytes(4, "little") + data[8:], "version 4 is not supported"),
        "fp32_as_bf16.bin": (data[:4] + (5).to_bytes(4, "little") + data[8:], "expected 58112 for version 5"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        err = bad_run(tiny_trainer, *args, "-e", tmp_path / name)
        assert message in err and name in err, (name, err)
    other = tiny.with_overrides(layers=3)
    write_model(tmp_path / "other.bin", other, init_params(other))
    err = bad_run(tiny_trainer, *args, "-e", tmp_path / "other.bin")
    assert "checkpoint sizes differ" in err and "layers=3" in err and "layers=2" in err
    assert model_header(tiny)[0] == 20240326
