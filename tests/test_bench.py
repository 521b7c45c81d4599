"""llmgen bench: it builds, runs and reports sane figures (the speed itself is not tested)."""

import json
import subprocess

import pytest

from llmgen import spec as specs
from llmgen.bench import flops_per_token
from llmgen.emit import emit

from conftest import llmgen


def test_bench_reports_sane_fields(tmp_path):
    out = tmp_path / "figures.json"
    result = llmgen("bench", "--spec", "test-tiny", "-b", 2, "-t", 16, "--threads", 2, "--steps", 3,
                    "--warmup", 1, "--json", out, "--build-dir", "build", cwd=tmp_path)  # a relative dir
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert (r["spec"], r["B"], r["T"], r["threads"], r["steps"], r["warmup"]) == ("test-tiny", 2, 16, 2, 3, 1)
    assert len(r["step_ms_all"]) == 3 and len(r["losses"]) == 4
    s, t = r["step_ms"], r["tokens_per_s"]
    assert 0 < s["min"] <= s["median"] <= s["max"]
    assert abs(t["median"] - 32 / (s["median"] / 1e3)) < 1e-6 * t["median"]
    assert t["min"] <= t["median"] <= t["max"]
    # test-tiny: 2 layers, 32 channels, vocab 64 (not padded)
    assert r["flops_per_token"] == {"matmul": 6 * (2 * 12 * 32 * 32 + 64 * 32), "attention": 6 * 2 * 32 * 17,
                                    "total": 6 * (2 * 12 * 32 * 32 + 64 * 32) + 6 * 2 * 32 * 17}
    assert abs(r["achieved_gflops"] - r["flops_per_token"]["total"] * t["median"] / 1e9) < 1e-9
    assert r["peak_gflops"] > 0 and r["sgemm_gflops"] > 0
    assert len(r["peak_gflops_runs"]) == 2 and r["peak_gflops"] == max(r["peak_gflops_runs"])  # before and after
    assert abs(r["mfu"] - r["achieved_gflops"] / r["peak_gflops"]) < 1e-12
    assert "-march=native" in r["compile"] and "train_gpt2.c" in r["compile"]
    assert r["other_load"] is None or 0 <= r["other_load"] <= 1
    assert r["isa"]["name"] in ("AVX-512", "AVX2", "SSE") and r["isa"]["tile"][0] > 0
    assert set(r["products_gflops"]) == {"qkv", "attproj", "fc", "fcproj", "classifier"}
    assert all(p["forward"] > 0 and p["backward"] > 0 for p in r["products_gflops"].values())
    assert r["peak_rss_bytes"] > 10e6 and r["mfu_target"] is None  # B*T = 32 < 1024: no MFU target
    for field in ["step:", "tokens/s:", "achieved:", "peak:", "MFU:", "build:", "isa:", "memory:", "matmuls:",
                  "torch:"]:
        assert field in result.stdout
    assert f"wrote {out}" in result.stdout


def test_flops_for_gpt2_124m():
    f = flops_per_token(specs.load("gpt2-124m"), 64)
    assert f["matmul"] == 6 * (12 * 12 * 768 * 768 + 50304 * 768)
    assert 190e9 < f["total"] * 256 < 191e9  # about 190.7 GFLOP per step at B=4, T=64


def test_bench_refuses_bad_sizes(tmp_path):
    bad = llmgen("bench", "--spec", "test-tiny", "-t", 33, "--build-dir", tmp_path)
    assert bad.returncode == 1 and "max_seq_len 32" in bad.stderr and "Traceback" not in bad.stderr
    bad = llmgen("bench", "--spec", "test-tiny", "--steps", 0, "--build-dir", tmp_path)
    assert bad.returncode == 2 and "--steps" in bad.stderr


@pytest.mark.parametrize("isa", [[], ["-mno-avx512f"], ["-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-avx"]],
                         ids=["native", "avx2", "sse"])
def test_peak_is_at_least_the_trainers_own_sgemm(tmp_path, isa):
    """The FMA peak kernel fits the registers of the instruction set it is built for, so no
    code (the trainer's gemm included) can beat it: MFU stays below 100%."""
    emit(specs.load("test-tiny"), tmp_path)
    cmd = ["gcc", "-Ofast", "-march=native", *isa, "-fopenmp", "-w", "bench_gpt2.c", "-lm", "-o", "bench_gpt2"]
    assert subprocess.run(cmd, cwd=tmp_path).returncode == 0
    env = {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}

    def run(*args):
        out = subprocess.run(["./bench_gpt2", *args], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()
    name = run("isa")[1]
    assert name == {0: "AVX-512", 1: "AVX2", 4: "SSE"}[len(isa)] or (not isa and name in ("AVX2", "SSE"))
    peaks = [float(run("peak")[1])]
    sgemm = float(run("matmul", "1024")[1])
    peaks.append(float(run("peak")[1]))  # twice, around the gemm: a busy moment does not decide it
    assert max(peaks) >= sgemm > 0, (peaks, sgemm)


def test_bench_sample_reports_sane_fields(tmp_path):
    """--sample: tokens/s within one window (test-tiny's 32 positions: 16 after the 16-token
    prompt, not the default 256), the bandwidth and the bound it implies."""
    out = tmp_path / "sample.json"
    result = llmgen("bench", "--spec", "test-tiny", "--sample", "--threads", 2, "--json", out,
                    "--build-dir", tmp_path / "build")
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    assert (r["spec"], r["prompt"], r["tokens"], r["threads"]) == ("test-tiny", 16, 16, 2)
    t = r["tokens_per_s"]
    assert 0 < t["min"] <= t["median"] <= t["max"]
    assert r["bandwidth_gbs"] > 0 and r["parameters"] > 0
    assert abs(r["bound_tokens_per_s"] - r["bandwidth_gbs"] * 1e9 / (4 * r["parameters"])) < 1e-6 * r["bound_tokens_per_s"]
    assert "16 new tokens after 16" in result.stdout and "bound:" in result.stdout
