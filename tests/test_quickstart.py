"""`llmgen train` and `llmgen sample` end to end, on a GPT-2-vocab model small enough for a test."""

import pytest

from conftest import MICRO, llmgen
from llmgen import reference, spec as specs
from llmgen.fileio import write_model
from llmgen.tokenizer import data_file


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    (root / "micro.toml").write_text(MICRO)
    (root / "text.txt").write_text(data_file("shakespeare.txt").read_text()[:20_000])
    args = ["train", "--spec", root / "micro.toml", "--data", root / "text.txt", "--steps", 6, "-b", 2, "-t", 16,
            "--val-every", 3, "--sample-tokens", 20, "-o", root / "out"]
    first = llmgen(*args)
    assert first.returncode == 0, first.stderr
    return root, args, first


def test_train_prints_losses_and_a_sample(quickstart):
    root, _, r = quickstart
    out = r.stdout
    assert "[1/3] trainer for micro" in out and "[2/3] data: 1 document" in out
    assert "step 1/6 | loss" in out and "step 6/6 | loss" in out
    assert "val loss" in out and "after 6 steps" in out
    sample = out.split("sample after 6 steps (temperature 0.8, top-k 40):\n---\n")[1].split("\n---\n")[0]
    assert len(sample) > 10                      # text, not token ids
    assert "final val loss" in out and (root / "out/run/model_00000006.bin").exists()
    assert "llmgen sample --checkpoint" in out


def test_second_run_reuses_build_and_data(quickstart):
    root, args, _ = quickstart
    exe, shard = root / "out/trainer/train_gpt2", root / "out/data/train_000000.bin"
    before = exe.stat().st_mtime_ns, shard.stat().st_mtime_ns
    r = llmgen(*args)
    assert r.returncode == 0, r.stderr
    assert "[2/3] data: reusing" in r.stdout
    assert (exe.stat().st_mtime_ns, shard.stat().st_mtime_ns) == before
    # a changed spec rebuilds the trainer; the data stays
    (root / "micro.toml").write_text(MICRO.replace("channels = 16", "channels = 24"))
    r = llmgen(*args)
    assert r.returncode == 0, r.stderr
    assert exe.stat().st_mtime_ns != before[0] and shard.stat().st_mtime_ns == before[1]
    assert "channels 24" in (root / "out/trainer/train_gpt2.c").read_text() or \
        "#define CHANNELS 24" in (root / "out/trainer/train_gpt2.c").read_text()


def test_sample_continues_the_prompt(quickstart, tmp_path):
    root, _, _ = quickstart
    ckpt = next((root / "out/run").glob("model_*.bin"))
    r = llmgen("sample", "--checkpoint", ckpt, "--prompt", "ROMEO: héllo", "-n", 15, "--build-dir", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO: héllo") and len(r.stdout) > len("ROMEO: héllo") + 5
    again = llmgen("sample", "--checkpoint", ckpt, "--prompt", "ROMEO: héllo", "-n", 15, "--build-dir", tmp_path / "b")
    assert again.stdout == r.stdout             # the same seed, the same text
    greedy = llmgen("sample", "-c", ckpt, "-p", "To be", "-n", 5, "--temperature", 0, "--build-dir", tmp_path / "b")
    assert greedy.returncode == 0 and greedy.stdout.startswith("To be")


def test_sample_and_train_errors(tmp_path):
    tiny = specs.load("test-tiny")
    write_model(tmp_path / "tiny.bin", tiny, reference.init_params(tiny))
    (tmp_path / "junk.bin").write_bytes(b"\0" * 2000)
    cases = [
        (["sample", "-c", tmp_path / "tiny.bin"], "vocab 64 is not GPT-2's 50257"),
        (["sample", "-c", tmp_path / "missing.bin"], "missing.bin: no such model checkpoint"),
        (["sample", "-c", tmp_path / "junk.bin"], "junk.bin: not an llm.c model checkpoint"),
        (["train", "--spec", "test-tiny", "-o", tmp_path / "o"], "spec test-tiny: vocab 64 is not GPT-2's"),
        (["train", "--spec", "gpt2-tiny", "-t", 1000, "-o", tmp_path / "o"], "-t 1000: must be between 1 and"),
        (["train", "--data", tmp_path / "nothing.txt", "-o", tmp_path / "o"], "nothing.txt: no such file or folder"),
    ]
    for args, message in cases:
        r = llmgen(*args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
