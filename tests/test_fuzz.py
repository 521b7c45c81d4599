"""`make fuzz`: libFuzzer targets (with ASan and UBSan) for the C trainer's readers, each run
briefly from seed files that the trainer itself wrote. A crash, a sanitizer report, a leak or a
die() message of more than one line fails the run. For the long runs:
    make -C DIR fuzz && DIR/fuzz_state -max_total_time=600 -jobs=1 -workers=1 CORPUS
"""

import shutil
import struct
import subprocess

import numpy as np
import pytest

from llmgen import spec as specs
from llmgen.emit import emit, make
from llmgen.fileio import write_shard

# The smallest model: files of a few KiB, so that the fuzzer mutates headers and values alike.
FUZZ_SPEC = """name = "fuzz-tiny"
layers = 1
heads = 1
channels = 4
vocab_size = 8
padded_vocab_size = 8
max_seq_len = 4
"""
SECONDS = 10  # per target here


def have_libfuzzer(tmp_path) -> bool:
    if shutil.which("clang") is None:
        return False
    src = tmp_path / "probe.c"
    src.write_text("#include <stddef.h>\n#include <stdint.h>\n"
                   "int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) { (void)d; (void)n; return 0; }\n")
    probe = subprocess.run(["clang", "-fsanitize=fuzzer,address,undefined", str(src), "-o", str(tmp_path / "probe")],
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def fuzzers(tmp_path_factory):
    """The fuzz-tiny trainer's fuzz targets, and a seed of each file they read."""
    out = tmp_path_factory.mktemp("fuzz")
    if not have_libfuzzer(out):
        pytest.skip("clang with libFuzzer (-fsanitize=fuzzer) is not installed")
    (out / "fuzz-tiny.toml").write_text(FUZZ_SPEC)
    spec = specs.load(str(out / "fuzz-tiny.toml"))
    emit(spec, out)
    make(out, "fuzz")
    trainer = make(out, "train_gpt2")
    # seeds: a shard, then the model and state files of one step trained on it
    seeds = {name: out / f"seeds_{name}" for name in ("model", "state", "shard", "tokenizer")}
    for d in seeds.values():
        d.mkdir()
    tokens = np.random.default_rng(0).integers(0, spec.vocab_size, 200)
    write_shard(seeds["shard"] / "shard.bin", tokens)
    args = ["-i", seeds["shard"] / "shard.bin", "-b", 2, "-t", 4, "-x", 1, "-n", 1, "-s", 0, "-o", out / "run"]
    subprocess.run([str(trainer), *map(str, args)], check=True, capture_output=True, env={"OMP_NUM_THREADS": "1"})
    shutil.copy(out / "run" / "model_00000001.bin", seeds["model"])
    shutil.copy(out / "run" / "state_00000001_00000.bin", seeds["state"])
    header = struct.pack("<256I", *([20240328, 2, spec.vocab_size, spec.vocab_size - 1] + [0] * 252))
    words = [b"a", b" b", b"\xc3\xa9", b"\xe2\x82", b"\xac", b"\n", b"\x00\xff", b"<|endoftext|>"]
    (seeds["tokenizer"] / "tokenizer.bin").write_bytes(header + b"".join(bytes([len(w)]) + w for w in words))
    return out, seeds


@pytest.mark.slow
@pytest.mark.parametrize("reader", ["model", "state", "shard", "tokenizer"])
def test_fuzz_reader_briefly(fuzzers, reader, tmp_path):
    out, seeds = fuzzers
    corpus = tmp_path / "corpus"
    shutil.copytree(seeds[reader], corpus)
    result = subprocess.run([str(out / f"fuzz_{reader}"), f"-max_total_time={SECONDS}", "-jobs=1", "-workers=1",
                             "-print_final_stats=1", str(corpus)], capture_output=True, text=True, cwd=tmp_path,
                            env={"TMPDIR": str(tmp_path)}, timeout=SECONDS + 60)
    assert result.returncode == 0 and "ERROR" not in result.stderr, result.stderr[-3000:]
    assert "Done" in result.stderr and not list(tmp_path.glob("crash-*"))
