"""The emitted C trainer (its -Ofast production build) given bad input and failing writes: each
is one `error:` line and exit status 1, or a warning where the input was not asked for; never
a crash, a hang, silent garbage or lost data. Found by a fuzzing and fault-injection pass."""

import math
import os
import resource
import signal
import struct
import subprocess

import numpy as np
import pytest

from llmgen import spec as specs
from llmgen.fileio import write_model
from llmgen.reference import init_params
from llmgen.tensors import num_params

from conftest import step_losses

COMMON = ["-b", 4, "-t", 16, "-v", 1000, "-s", 0, "-l", 3e-3]
TINY = specs.load("test-tiny")
N = num_params(TINY)  # 28544


def data_args(d):
    return ["-i", d / "train_*.bin", "-j", d / "val_*.bin"]


def run(exe, *args, cwd=None, stdout=subprocess.PIPE, file_limit=None, threads=2, timeout=60):
    """Run the trainer; file_limit caps the size of any file it writes (RLIMIT_FSIZE, with
    SIGXFSZ ignored, so that a write past it fails with EFBIG as on a full disk)."""
    def limit():
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(exe), *map(str, args)], stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=cwd, preexec_fn=limit, timeout=timeout)


def refused(result, *parts):
    """The one error line of a refused run (exit status 1); each of parts must be in it."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert str(part) in lines[0], (part, lines[0])
    return lines[0]


def checkpoint(exe, data, out, steps=2):
    """A run of `steps` steps with a checkpoint at the end, in out."""
    result = run(exe, *data_args(data), *COMMON, "-x", steps, "-n", steps, "-o", out)
    assert result.returncode == 0, result.stderr
    return out


# ---- the output dir is a path, never a pattern -------------------------------------------
def test_resume_takes_the_output_dir_literally(tiny_trainer, tiny_data, tmp_path):
    """-o 'run[1]' as a glob pattern matches run1/, not itself: the run resumed from the wrong
    run, or said "starting from scratch" and truncated its log and overwrote its checkpoints."""
    odd = checkpoint(tiny_trainer, tiny_data, tmp_path / "run[1]", steps=2)
    log = (odd / "main.log").read_text()
    resumed = run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 3, "-n", 3, "-o", odd, "-y", 1)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step 2 in {odd}" in resumed.stdout and sorted(step_losses(resumed.stdout)) == [3]
    assert (odd / "main.log").read_text().startswith(log)  # appended to, not truncated
    # beside a run that its pattern matches, it still resumes from its own checkpoints
    checkpoint(tiny_trainer, tiny_data, tmp_path / "run1", steps=5)
    again = run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 4, "-n", 4, "-o", odd, "-y", 1)
    assert again.returncode == 0, again.stderr
    assert f"resuming from step 3 in {odd}" in again.stdout
    assert sorted(p.name for p in (tmp_path / "run1").iterdir() if p.name.startswith("DONE")) == ["DONE_00000005"]


# ---- writes that fail ----------------------------------------------------------------------
def test_a_failed_write_to_stdout_is_an_error(tiny_trainer, tiny_data):
    with open("/dev/full", "w") as full:
        refused(run(tiny_trainer, "-h", stdout=full), "stdout: write failed (No space left on device)")
        refused(run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 2, stdout=full), "stdout: write failed")


def test_a_failed_log_write_stops_the_run(tiny_trainer, tiny_data, tmp_path):
    result = run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 100, "-o", tmp_path, file_limit=2000)
    refused(result, f"{tmp_path}/main.log: write failed (File too large)")
    assert 10 < len(step_losses(result.stdout)) < 100


def test_a_failed_checkpoint_leaves_no_temporary_and_the_last_one_intact(tiny_trainer, tiny_data, tmp_path):
    checkpoint(tiny_trainer, tiny_data, tmp_path, steps=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "main.log"}
    # the model file (114 KiB) cannot be written past 40 KiB
    result = run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 4, "-n", 2, "-o", tmp_path, "-y", 1,
                 file_limit=40_000)
    refused(result, f"{tmp_path}/model_00000004.bin.tmp: write failed (File too large)")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "main.log"}
    assert after == before  # no .tmp, no step-4 files, the step-2 checkpoint as it was


# ---- integer flags -------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["-b", 134217728, "-t", 32], "-b, -t: B*T = 4294967296 tokens is more than a batch can hold (2147483647)"),
    (["-b", 4294967297], "-b: expected an integer from 1 to 2147483647, got '4294967297'"),
    (["-x", 2147483648], "-x: expected an integer from -1 to 2147483647, got '2147483648'"),
    (["-g", 2147483647], "-g: expected an integer from 0 to 1073741824, got '2147483647'"),
    (["-d", -2], "-d: expected an integer from -1 to 2147483647"),
    (["-t", 4294967312], "-t: expected an integer from -2147483648 to 2147483647"),
    (["-v", -1], "-v: expected an integer from 0"),
    (["-y", 2], "-y: expected an integer from 0 to 1, got '2'"),
    (["-S", 2 ** 64], "-S: expected an integer from -9223372036854775808 to 9223372036854775807"),
])
def test_integer_flags_out_of_range_are_refused(tiny_trainer, tiny_data, args, message):
    refused(run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 1, *args), message)


# ---- the state file's fields ---------------------------------------------------------------
def patched(path, offset, fmt, value):
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("field, offset, fmt, value, message", [
    ("step", 40, "<i", -1, "training state step -1 is negative"),
    ("step", 40, "<i", -2 ** 31, "training state step -2147483648 is negative"),
    ("step", 40, "<i", 7, "training state step 7 is not the step 2 of its name"),
    ("shard", 120, "<Q", 2, "training state shard 2 is not one of this run's 2 train shards"),
    ("batch", 128, "<Q", 2 ** 62, "training state batch 4611686018427387904 (of 64 tokens each) is past the end of train shard"),
    ("batch", 128, "<Q", 157, "training state batch 157 (of 64 tokens each) is past the end of train shard 0 (10000 tokens)"),
    ("batch tokens", 136, "<Q", 2 ** 63, "past the end of train shard 0"),
])
def test_a_state_file_that_does_not_fit_the_run_is_refused(tiny_trainer, tiny_data, tmp_path, field, offset, fmt, value,
                                                           message):
    out = checkpoint(tiny_trainer, tiny_data, tmp_path / "run")
    state = out / "state_00000002_00000.bin"
    patched(state, offset, fmt, value)
    result = run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 4, "-o", out, "-y", 1)
    refused(result, state, message)


# ---- NaN and infinity ----------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("-l", "nan"), ("-l", "inf"), ("-c", "inf"), ("-q", "nan"), ("-G", "-inf"),
                                         ("-R", "nan"), ("-l", "1e39"), ("-l", "-1")])
def test_non_finite_float_flags_are_refused(tiny_trainer, tiny_data, flag, value):
    refused(run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 1, flag, value),
            f"{flag}: expected a finite number >= 0, got '{value}'")


def test_non_finite_checkpoints_and_states_are_refused(tiny_trainer, tiny_data, tmp_path):
    params = init_params(TINY)
    params["wte"][3, 5] = np.nan
    write_model(tmp_path / "nan.bin", TINY, params)
    refused(run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 1, "-e", tmp_path / "nan.bin"),
            "nan.bin: model checkpoint parameter 101 of 28544 is nan (must be finite)")
    params["wte"][3, 5] = np.inf
    write_model(tmp_path / "inf.bin", TINY, params, version=5)  # bf16
    refused(run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 1, "-e", tmp_path / "inf.bin"),
            "inf.bin: model checkpoint parameter 101 of 28544 is inf")
    out = checkpoint(tiny_trainer, tiny_data, tmp_path / "run")
    state = out / "state_00000002_00000.bin"
    good = state.read_bytes()
    for offset, value, message in [(1024 + 4 * 7, math.nan, "training state first moment 7 of 28544 is nan"),
                                   (1024 + 4 * (N + 9), -1.0, "training state second moment 9 of 28544 is -1 (must be finite and >= 0)"),
                                   (1024 + 4 * (N + 9), math.nan, "training state second moment 9 of 28544 is nan")]:
        state.write_bytes(good)
        patched(state, offset, "<f", value)
        refused(run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 3, "-o", out, "-y", 1), message)


def test_a_diverging_run_stops_and_keeps_its_last_checkpoint(tiny_trainer, tiny_data, tmp_path):
    result = run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 10, "-n", 1, "-o", tmp_path, "-l", 1e30)
    line = refused(result, "step 2: the loss is", "nan: training diverged")
    assert "-l" in line and sorted(step_losses(result.stdout)) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DONE_00000001", "main.log", "model_00000001.bin",
                                                          "state_00000001_00000.bin"]


# ---- FIFOs and other files that are not regular --------------------------------------------
def test_fifos_and_dirs_are_refused_unread(tiny_trainer, tiny_data, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    base = [*data_args(tiny_data), *COMMON, "-x", 1]
    for args in (["-e", fifo], ["-i", fifo], ["-j", fifo], ["-T", fifo], ["-e", tmp_path]):
        refused(run(tiny_trainer, *base, *args, timeout=20), args[1], "not a regular file")
    out = checkpoint(tiny_trainer, tiny_data, tmp_path / "run")
    state = out / "state_00000002_00000.bin"
    state.unlink()
    os.mkfifo(state)
    refused(run(tiny_trainer, *base, "-x", 3, "-o", out, "-y", 1, timeout=20), state, "a FIFO, not a regular file")


# ---- the default tokenizer is optional -------------------------------------------------------
def test_a_corrupt_default_tokenizer_is_a_warning(tiny_trainer, tiny_data, tmp_path):
    (tmp_path / "gpt2_tokenizer.bin").write_bytes(b"\x00" * 100)
    result = run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 1, "-s", 1, "-g", 5, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("warning: gpt2_tokenizer.bin: truncated tokenizer file (100 bytes, shorter than its "
                                     "header): samples are printed as token ids")
    assert "samples: token ids" in result.stdout
    refused(run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 1, "-T", "gpt2_tokenizer.bin", cwd=tmp_path),
            "gpt2_tokenizer.bin: truncated tokenizer file")


# ---- OpenMP threads ---------------------------------------------------------------------------
def test_too_many_threads_are_capped(tiny_trainer, tiny_data):
    result = run(tiny_trainer, *data_args(tiny_data), *COMMON, "-x", 1, threads=100000)
    assert result.returncode == 0, (result.returncode, result.stderr)
    cores = os.sysconf("SC_NPROCESSORS_ONLN")
    assert result.stderr == f"warning: 100000 OpenMP threads for {cores} cores: using {4 * cores}\n"
    assert f"; {4 * cores} threads" in result.stdout
