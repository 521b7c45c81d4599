"""llm.c model checkpoints in Python: version 3 (fp32) and 5 (bf16) round trips, bf16 rounding,
and the emitted program loading a bf16 checkpoint written here."""

import os
import re
import struct

import numpy as np
import pytest

from llmgen import reference as ref
from llmgen import spec as specs
from llmgen.errors import LlmgenError
from llmgen.fileio import from_bf16, read_model, read_model_spec, to_bf16, write_model
from llmgen.tensors import num_params, parameters
from llmgen.verify import build, rel_error, run_harness

from conftest import llmgen, refused

ODD = specs.load("test-odd")


def bf16_nearest(x: float) -> float:
    """The bfloat16 nearest to a finite float32 x, ties to even, by arithmetic on the two
    neighbours (an independent check of to_bf16's bit trick)."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    lo_bits = bits & 0xFFFF0000
    lo = struct.unpack("<f", struct.pack("<I", lo_bits))[0]
    if lo == x:
        return lo
    hi_bits = lo_bits + 0x10000  # away from zero; may be infinity
    hi = struct.unpack("<f", struct.pack("<I", hi_bits))[0]
    hi_dist = abs(hi - x) if np.isfinite(hi) else abs(2.0 ** 128 - abs(x))  # inf sits where 2^128 would
    lo_dist = abs(x - lo)
    if lo_dist < hi_dist or (lo_dist == hi_dist and (lo_bits >> 16) % 2 == 0):
        return lo
    return hi


def test_fp32_round_trip_is_exact(tmp_path):
    params = ref.init_params(ODD, seed=1)
    params["fcb"][0, :3] = [np.nan, np.inf, -0.0]
    write_model(tmp_path / "m.bin", ODD, params)
    spec, back, version = read_model(tmp_path / "m.bin", with_version=True)
    assert spec == ODD and spec.name == "m" and version == 3
    assert (tmp_path / "m.bin").stat().st_size == 1024 + 4 * num_params(ODD)
    for t in parameters(ODD):
        assert back[t.name].dtype == np.float32
        assert np.array_equal(back[t.name].view(np.uint32), params[t.name].view(np.uint32)), t.name


def test_bf16_round_trip(tmp_path):
    params = ref.init_params(ODD, seed=2)
    write_model(tmp_path / "m5.bin", ODD, params, version=5)
    assert (tmp_path / "m5.bin").stat().st_size == 1024 + 2 * num_params(ODD)
    assert read_model_spec(tmp_path / "m5.bin") == (ODD, 5)
    spec, back, version = read_model(tmp_path / "m5.bin", with_version=True)
    assert spec == ODD and version == 5
    for t in parameters(ODD):
        expected = from_bf16(to_bf16(params[t.name]))
        assert np.array_equal(back[t.name], expected), t.name
        # normwise error of a whole tensor is within the per-value bound
        assert rel_error(back[t.name], params[t.name]) <= 2.0 ** -8
    # bf16 values are exact in both versions: writing them again changes nothing
    write_model(tmp_path / "again5.bin", ODD, back, version=5)
    assert (tmp_path / "again5.bin").read_bytes() == (tmp_path / "m5.bin").read_bytes()
    write_model(tmp_path / "as3.bin", ODD, back, version=3)
    _, back3 = read_model(tmp_path / "as3.bin")
    assert all(np.array_equal(back3[t.name], back[t.name]) for t in parameters(ODD))


def test_bf16_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    # random bit patterns cover every exponent (subnormals too) and every rounding case
    bits = rng.integers(0, 2 ** 32, 20_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    got = from_bf16(to_bf16(x))
    want = np.array([bf16_nearest(float(v)) for v in x], dtype=np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # ties go to the even neighbour: 1 + 2^-8 down to 1, 1 + 3*2^-8 up to 1 + 2^-6
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], dtype=np.float32)
    assert from_bf16(to_bf16(ties)).tolist() == [1.0, 1 + 2 ** -6, -1.0]


def test_bf16_error_bound():
    rng = np.random.default_rng(1)
    # normal numbers over the whole exponent range, and values just above ties
    x = (rng.uniform(1, 2, 200_000) * 2.0 ** rng.integers(-126, 127, 200_000)).astype(np.float32)
    x *= rng.choice([-1, 1], x.size).astype(np.float32)
    b = from_bf16(to_bf16(x)).astype(np.float64)
    rel = np.abs(b - x) / np.abs(x)
    assert rel.max() <= 2.0 ** -8
    assert rel.max() > 0.99 * 2.0 ** -8  # the bound is tight: 2^-9 would not hold
    assert (np.abs(b - x) <= 2.0 ** -8 * np.abs(b)).all()
    # below 2^-126 the absolute error is at most 2^-134
    tiny = (rng.uniform(-1, 1, 10_000) * 2.0 ** -126).astype(np.float32)
    assert np.abs(from_bf16(to_bf16(tiny)).astype(np.float64) - tiny).max() <= 2.0 ** -134


def test_bf16_special_values():
    f32max = np.finfo(np.float32).max
    x = np.array([np.inf, -np.inf, 0.0, -0.0, f32max, -f32max], dtype=np.float32)
    b = from_bf16(to_bf16(x))
    assert b[0] == np.inf and b[1] == -np.inf
    assert b[2] == 0 and not np.signbit(b[2]) and b[3] == 0 and np.signbit(b[3])
    assert b[4] == np.inf and b[5] == -np.inf  # beyond bfloat16's range: rounds to infinity
    bf16max = from_bf16(np.array([0x7F7F], dtype=np.uint16))[0]
    assert from_bf16(to_bf16(np.array([bf16max], dtype=np.float32)))[0] == bf16max
    # NaNs stay NaN with their sign, also one whose payload is only in the dropped bits
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF80FFFF, 0x7FFFFFFF], dtype=np.uint32)
    out = to_bf16(nans.view(np.float32))
    assert np.isnan(from_bf16(out)).all()
    assert [int(v) >> 15 for v in out] == [0, 1, 0, 1, 0]


def test_bad_model_files(tmp_path):
    write_model(tmp_path / "m5.bin", ODD, ref.init_params(ODD), version=5)
    data = (tmp_path / "m5.bin").read_bytes()
    need = 2 * num_params(ODD)
    cases = {
        "truncated.bin": (data[:-2], f"holds {need - 2} bytes of parameters, its header's sizes need {need} (bf16, version 5)"),
        "version.bin": (data[:4] + struct.pack("<i", 4) + data[8:], "version 4 is not supported"),
        "short.bin": (data[:100], "truncated model checkpoint"),
        "magic.bin": (b"\x00" * 4 + data[4:], "not an llm.c model checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(LlmgenError, match=re.escape(message)):
            read_model(tmp_path / name)
    with pytest.raises(LlmgenError, match="no such model checkpoint"):
        read_model(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="version 4"):
        write_model(tmp_path / "x.bin", ODD, ref.init_params(ODD), version=4)


def test_emitted_program_loads_bf16(tmp_path):
    """The harness on a version 5 file computes exactly what it computes on the version 3 file
    of the bf16-rounded weights, and that matches the reference on the rounded weights."""
    exe = build(ODD, tmp_path / "build")
    params = ref.init_params(ODD, seed=5)
    rounded = {k: from_bf16(to_bf16(v)) for k, v in params.items()}
    assert any(not np.array_equal(rounded[k], params[k]) for k in params)
    B, T = 2, 11
    tokens = np.random.default_rng(6).integers(0, ODD.vocab_size, B * T + 1)
    hp = {"lr": 1e-3, "warmup": 0, "final_frac": 1.0, "weight_decay": 0.0, "grad_clip": 0.0}
    c5 = run_harness(exe, tmp_path, ODD, params, tokens, B, T, 1, 1, hp, threads=2, version=5)
    c3 = run_harness(exe, tmp_path, ODD, rounded, tokens, B, T, 1, 1, hp, threads=2, version=3)
    for key in c5:
        if isinstance(c5[key], dict):  # named activations and their gradients
            for name in c5[key]:
                assert np.array_equal(c5[key][name], c3[key][name]), (key, name)
        else:
            assert np.array_equal(c5[key], c3[key]), key
    p64 = {k: v.astype(np.float64) for k, v in rounded.items()}
    logits, loss, _ = ref.forward(ODD, p64, tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T))
    assert rel_error(c5["logits"], logits) < 2e-5
    assert abs(c5["loss"][0] - loss) < 2e-5 * loss
    # and not what the unrounded weights give
    _, loss_unrounded, _ = ref.forward(ODD, {k: v.astype(np.float64) for k, v in params.items()},
                                       tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T))
    assert abs(loss_unrounded - loss) > 10 * abs(c5["loss"][0] - loss)


def test_written_files_get_the_usual_permissions(tmp_path):
    write_model(tmp_path / "m.bin", ODD, ref.init_params(ODD))
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "m.bin").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("layers, channels, heads, message", [
    (100000, 50000, 50, "field 'channels': too large: 4 * channels * channels = 10,000,000,000 elements"),
    (100000, 768, 12, "too large to load: the checkpoint's 708,826,621,440 parameters need 2,640.6 GiB of memory"),
])
def test_huge_sparse_checkpoint_is_refused_before_allocating(tmp_path, layers, channels, heads, message):
    """A valid header claiming enormous sizes, and a sparse body as large as they need."""
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, 3, 1024, 50257, layers, heads, channels, 50304]
    C, L = channels, layers  # GPT-2's parameter count, by hand (the spec refuses some of these sizes)
    n = 50304 * C + 1024 * C + L * (12 * C * C + 13 * C) + 2 * C
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.write(header.tobytes())
        try:
            f.truncate(1024 + 4 * n)
        except OSError:  # more than this file system holds even sparse: the header alone
            if "memory" in message:
                pytest.skip("the file system cannot hold a sparse file this large")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if 4 * n <= total:
        pytest.skip("this machine could load it")
    r = llmgen("export-hf", path, "-o", tmp_path / "hf", timeout=120)
    refused(r, f"{path}: ", message.split(" need ")[0])
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("stem", ["my model (1)", "..x", "$(shell echo hi)", "-x", ".hidden", "x" * 100, "a\nb"])
def test_checkpoint_names_are_made_plain_not_refused(tmp_path, stem):
    path = tmp_path / f"{stem}.bin"
    write_model(path, ODD, ref.init_params(ODD))
    spec, _ = read_model_spec(path)
    assert spec == ODD and specs.valid_name(spec.name)
    r = llmgen("info", "--spec-from", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(spec.name + " ")
    if stem == "my model (1)":
        assert spec.name == "my_model__1_"
