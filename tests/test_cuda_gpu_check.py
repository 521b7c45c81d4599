"""scripts/gpu_check.sh, the GPU checks in one command, where it can run without a GPU: it
stops at once saying "no GPU" (writing its two files), and it reads a trainer's log right."""

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from llmgen.verify import cuda_device_problem

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def env():
    """This Python first on PATH, as python3 (the script runs python3)."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.skipif(cuda_device_problem() is None, reason="a CUDA device is present: the script would run every check")
def test_without_a_gpu_it_stops_in_seconds(tmp_path):
    if not Path(sys.executable).parent.joinpath("python3").exists():
        pytest.skip("no python3 beside this Python")
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env(),
                            timeout=60)
    assert time.monotonic() - start < 20
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no GPU: " in result.stdout and "Traceback" not in result.stdout + result.stderr
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["logs.tar.gz", "summary.txt"]  # at most two files, whatever happens
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip())  # the table, printed last
    assert "GPU" in summary and "no GPU: " in summary
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        assert all(name.startswith("logs") for name in tar.getnames())


TRAINER_LOG = """\
model gpt2-124m: 12 layers, 12 heads, 768 channels, vocab 50257 (padded 50304), 124475904 parameters
train /tmp/d/train_*.bin: 85 batches of B=16 x T=1024; total batch 16384 tokens in 1 micro-batch; 5 steps; \
NVIDIA H200 (sm_90), bf16, cuBLASLt bf16 matmuls, 8555.0 MiB (8970602500 bytes) on the GPU
step 1/5 | loss 10.990000 | lr 3.00e-04 | norm 15.0000 | 900.00 ms | 18204 tok/s
step 2/5 | loss 9.500000 | lr 3.00e-04 | norm 5.0000 | 130.00 ms | 126030 tok/s
step 3/5 | loss 8.500000 | lr 3.00e-04 | norm 5.0000 | 120.00 ms | 136533 tok/s
step 4/5 | loss 7.500000 | lr 3.00e-04 | norm 5.0000 | 100.00 ms | 163840 tok/s
step 5/5 | loss 6.250000 | lr 3.00e-04 | norm 5.0000 | 110.00 ms | 148945 tok/s
"""


@pytest.mark.parametrize("extra, notes", [("", 0), ("note: cuBLASLt has no algorithm for the matmul m=8: ...\n", 1)])
def test_it_reads_a_trainer_log(tmp_path, extra, notes):
    """Step 1's loss, the last, the median ms of the steps after the first two (the warmup),
    tok/s from it, the device bytes the trainer says it allocated, and the fallback notes."""
    log = tmp_path / "run.log"
    log.write_text(TRAINER_LOG + extra)
    result = subprocess.run(["bash", str(SCRIPT), "--figures", str(log), "16"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10.990000", "6.250000", "110.00", "148945", "8970602500", str(notes)]
    log.write_text("error: out of GPU memory\n")
    result = subprocess.run(["bash", str(SCRIPT), "--figures", str(log), "16"], capture_output=True, text=True)
    assert result.stdout.split() == ["-", "-", "-", "-", "-", "0"]
