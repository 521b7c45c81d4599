import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmgen import spec as specs
from llmgen import trainer_output
from llmgen.emit import emit, make
from llmgen.fileio import write_shard
from llmgen.synthetic import markov_tokens

# The smallest spec with GPT-2's vocab (the tokenizer's text in and out): 1 layer, 2 heads, 16 channels.
MICRO = """name = "micro"
layers = 1
heads = 2
channels = 16
vocab_size = 50257
max_seq_len = 32
"""


def llmgen(*args, cwd=None, timeout=None):
    """Run the llmgen command line; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "llmgen", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def refused(result, *parts) -> str:
    """The one line a refused command printed on stderr (exit status 1, no traceback), without
    its error prefix (whatever its case); each of parts must be in it."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    prefix, sep, message = lines[0].partition(": ")
    assert sep and prefix.lower() == "error", lines[0]
    for part in parts:
        assert str(part) in message, (part, message)
    return message


@pytest.fixture(scope="session")
def tiny_trainer(tmp_path_factory) -> Path:
    """The emitted and built trainer for the test-tiny preset."""
    out = tmp_path_factory.mktemp("test-tiny")
    emit(specs.load("test-tiny"), out)
    make(out)
    return out / "train_gpt2"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Markov-chain shards for vocab 64: two train shards and one val shard."""
    out = tmp_path_factory.mktemp("data")
    train, val, _ = markov_tokens(64, 20_000, 4_000, seed=1)
    write_shard(out / "train_000000.bin", train[:10_000])
    write_shard(out / "train_000001.bin", train[10_000:])
    write_shard(out / "val_000000.bin", val)
    return out


def run_trainer(exe, *args, threads=2, check=True):
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def step_losses(stdout: str) -> dict[int, float]:
    """{step: loss} from the trainer's step lines."""
    return {n: s.loss for n, s in trainer_output.steps(stdout).items()}


def random_tokens(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n)
