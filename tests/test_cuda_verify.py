"""llmgen verify --target cuda, and the CUDA trainer run as a user runs it. Without a GPU only
the first test runs: verify must say that there is no CUDA device, in one line."""

import math

import numpy as np
import pytest

from llmgen import spec as specs
from llmgen.emit import emit, make
from llmgen.enums import Target
from llmgen.tensors import activations, parameters
from llmgen.verify import cuda_device_problem, verify

from llmgen import trainer_output

from conftest import llmgen, run_trainer, step_losses

PROBLEM = cuda_device_problem()
needs_gpu = pytest.mark.skipif(PROBLEM is not None, reason=f"no CUDA device: {PROBLEM}")


@pytest.mark.skipif(PROBLEM is None, reason="a CUDA device is present")
def test_verify_without_a_device_says_so(tmp_path):
    result = llmgen("verify", "--spec", "test-odd", "--target", "cuda", "--build-dir", tmp_path)
    assert result.returncode == 1
    assert "no CUDA device: " in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("matmul", ["cublaslt", "tiled"])
@pytest.mark.parametrize("name, overrides, B, T", [
    ("test-odd", {}, 2, 13),
    ("test-tiny", {"heads": 1, "channels": 64, "layers": 3, "vocab_size": 129}, 3, 32),  # HS 64, T = max_seq_len
])
def test_verify_cuda_passes(tmp_path, precision, matmul, name, overrides, B, T):
    spec = specs.load(name).with_overrides(**overrides)
    rows = verify(spec, B=B, T=T, build_dir=tmp_path, target="cuda", precision=precision, matmul=matmul)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    # every activation after its forward op; the backward keeps no activation gradients, so
    # it is compared by the parameter gradients of each layer
    L = spec.n_layer
    for a in activations(spec, Target.CUDA):
        if a.name != "logits":
            assert sum(r.phase == "forward" and r.name == a.name for r in rows) == (L if a.per_layer else 1)
    for p in parameters(spec):
        assert sum(r.phase == "backward" and r.name == "d" + p.name for r in rows) == (L if p.per_layer else 1)
    assert all(r.name[1:] in {p.name for p in parameters(spec)} for r in rows if r.phase == "backward")


@pytest.mark.gpu
@needs_gpu
def test_verify_cuda_catches_a_wrong_kernel(tmp_path):
    """A dropped digit in the GELU kernel of an edited copy (the tiled build: no cuBLASLt
    epilogue) must fail there first; the unedited copy passes."""
    from llmgen.emit import cuda_build, emit
    from llmgen.verify import first_divergence
    spec = specs.load("test-tiny")
    with cuda_build(tf32=False):
        emit(spec, tmp_path / "emitted", "cuda", "fp32", "tiled")
    original = (tmp_path / "emitted" / "train_gpt2.cu").read_text()
    trainer = tmp_path / "train_gpt2.cu"
    trainer.write_text(original)
    rows = verify(spec, B=2, T=8, steps=2, build_dir=tmp_path / "b", target="cuda", matmul="tiled", trainer=trainer)
    assert first_divergence(rows) is None
    assert "0.044715f * x * x * x" in original
    trainer.write_text(original.replace("0.044715f * x * x * x", "0.04715f * x * x * x"))
    rows = verify(spec, B=2, T=8, steps=2, build_dir=tmp_path / "b", target="cuda", matmul="tiled", trainer=trainer)
    assert first_divergence(rows).startswith("first divergence: forward, layer 0, gelu (fch_gelu "), first_divergence(rows)
    assert not next(r for r in rows if r.name == "logits").ok


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def cuda_trainer(request, tmp_path_factory):
    if PROBLEM is not None:
        pytest.skip(f"no CUDA device: {PROBLEM}")
    out = tmp_path_factory.mktemp(f"cuda-{request.param}")
    emit(specs.load("test-tiny"), out, "cuda", request.param)
    return make(out, "train_gpt2cu")


COMMON = ["-b", 4, "-t", 16, "-v", 1000, "-s", 0, "-l", 3e-3]


def data_args(d):
    return ["-i", d / "train_*.bin", "-j", d / "val_*.bin"]


@pytest.mark.gpu
def test_cuda_loss_falls_and_logs_like_c(cuda_trainer, tiny_data, tmp_path):
    result = run_trainer(cuda_trainer, *data_args(tiny_data), *COMMON, "-x", 60, "-v", 30, "-s", 30, "-g", 20, "-o", tmp_path)
    losses = step_losses(result.stdout)
    assert sorted(losses) == list(range(1, 61))
    assert abs(losses[1] - math.log(64)) < 0.3
    assert np.mean([losses[s] for s in range(51, 61)]) < losses[1] - 1.0
    line = next(line for line in result.stdout.splitlines() if line.startswith("step 1/60"))
    assert [f.strip().split()[0] for f in line.split("|")][:4] == ["step", "loss", "lr", "norm"]
    assert "total batch 64 tokens in 1 micro-batch; 60 steps; " in result.stdout and " matmuls" in result.stdout
    samples = trainer_output.samples(result.stdout)
    assert len(samples) == 2 and len(samples[0].split()) == 20 and all(0 <= int(x) < 64 for x in samples[0].split())
    log = (tmp_path / "main.log").read_text().splitlines()
    assert log[0].startswith("s:0 tel:") and sum("trl:" in line for line in log) == 60


@pytest.mark.gpu
def test_cuda_resume_continues_the_run(cuda_trainer, tiny_data, tmp_path):
    full = run_trainer(cuda_trainer, *data_args(tiny_data), *COMMON, "-x", 6, "-o", tmp_path / "full")
    run_trainer(cuda_trainer, *data_args(tiny_data), *COMMON, "-x", 6, "-n", 3, "-o", tmp_path / "part")
    assert (tmp_path / "part" / "DONE_00000003").exists()
    for f in (tmp_path / "part").glob("*_00000006*"):
        f.unlink()
    (tmp_path / "part" / "DONE_00000006").unlink(missing_ok=True)
    resumed = run_trainer(cuda_trainer, *data_args(tiny_data), *COMMON, "-x", 6, "-y", 1, "-o", tmp_path / "part")
    assert "resuming from step 3" in resumed.stdout
    a, b = step_losses(full.stdout), step_losses(resumed.stdout)
    assert sorted(b) == [4, 5, 6] and all(abs(a[s] - b[s]) < 1e-6 for s in b), (a, b)
