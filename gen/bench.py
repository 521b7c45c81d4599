"""`llmgen bench`: how fast the emitted trainer trains, against this machine's own peak.

The trainer is emitted and built with the flags of its Makefile (the production build), then
run for warm-up plus N steps on synthetic token shards; its own per-step timings are parsed
from its output. In the same run, bench_gpt2 (emitted with the trainer, same flags) measures
the machine's FMA peak and the trainer's matmul on a 2048^3 problem, for reference.

FLOPs are counted from the spec (spec.flops_per_token), in the usual way for MFU: the matmuls and
the attention, forward and backward; elementwise work (layernorm, GELU, softmax, residuals,
AdamW) is not counted.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .emit import emit, make
from .errors import LlmgenError
from .fileio import write_atomic, write_shard
from . import trainer_output
from .spec import Spec, flops_per_token
from .synthetic import markov_tokens

SGEMM_SIZE = 2048  # the square matmul the trainer's own matmul_forward is timed on


def compile_command(build_dir: Path, target: str, cc: str = "gcc") -> str:
    """The compiler command make runs for target (asked with make -n, so nothing is rebuilt)."""
    result = subprocess.run(["make", "-s", "-B", "-n", target, f"CC={cc}"], cwd=build_dir, capture_output=True,
                            text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        raise LlmgenError(f"{build_dir}: make -n {target} failed:\n{result.stdout}{result.stderr}")
    return lines[-1].strip()


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have run so far (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _run(args: list[str], cwd: Path, threads: int, what: str) -> tuple[str, float | None]:
    """Run a program with OMP_NUM_THREADS. Returns its stdout and the share of the machine's
    CPU time that other processes took meanwhile (None where that cannot be read): timings
    taken on a busy machine are slower, and this says how busy it was."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = _busy_cpu_seconds()
    t0 = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    busy_after = _busy_cpu_seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise LlmgenError(f"{what} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    ours = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    others = None
    if busy_before is not None and busy_after is not None and wall > 0:
        others = max(0.0, busy_after - busy_before - ours) / (wall * (os.cpu_count() or 1))
    return result.stdout, others


def _reference(exe: Path, args: list[str], threads: int) -> float:
    out, _ = _run([str(exe.resolve()), *args], exe.parent, threads, f"{exe.name} {' '.join(args)}")
    return float(out.split()[-1])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench(spec: Spec, B: int, T: int, threads: int, steps: int, warmup: int,
          build_dir: str | Path | None = None) -> dict:
    if B <= 0 or T <= 0 or T > spec.max_seq_len:
        raise LlmgenError(f"-b {B} -t {T}: need B >= 1 and 1 <= T <= max_seq_len {spec.max_seq_len}")
    if steps <= 0 or warmup < 0 or threads <= 0:
        raise LlmgenError("--steps and --threads must be positive and --warmup not negative")
    build_dir = Path(build_dir or Path("build") / f"bench-{spec.name}")
    emit(spec, build_dir)
    exe = make(build_dir, "train_gpt2")
    ref_exe = make(build_dir, "bench_gpt2")
    flags = compile_command(build_dir, "train_gpt2")

    load_before = os.getloadavg()[0]
    peak = _reference(ref_exe, ["peak"], threads)
    sgemm = _reference(ref_exe, ["matmul", str(SGEMM_SIZE)], threads)

    total_steps = warmup + steps
    with tempfile.TemporaryDirectory(prefix="llmgen-bench-") as tmp:
        tokens, _, _ = markov_tokens(spec.vocab_size, total_steps * B * T + 1, 1, seed=0)
        write_shard(Path(tmp) / "train_000000.bin", tokens)
        args = [str(exe.resolve()), "-i", str(Path(tmp) / "train_*.bin"), "-b", str(B), "-t", str(T),
                "-x", str(total_steps), "-v", "0", "-s", "0"]
        out, others = _run(args, Path(tmp), threads, f"{exe}")
    timed = {n: (s.loss, s.ms) for n, s in trainer_output.steps(out).items()}
    if sorted(timed) != list(range(1, total_steps + 1)):
        raise LlmgenError(f"{exe}: expected {total_steps} step lines in its output, got:\n{out}")
    ms = [timed[s][1] for s in range(warmup + 1, total_steps + 1)]
    tokens_per_step = B * T
    flops = flops_per_token(spec, T)
    step = _stats(ms)
    tok_s = {"median": tokens_per_step / (step["median"] / 1e3), "min": tokens_per_step / (step["max"] / 1e3),
             "max": tokens_per_step / (step["min"] / 1e3)}
    achieved = flops["total"] * tok_s["median"] / 1e9
    return {
        "spec": spec.name, "B": B, "T": T, "threads": threads, "steps": steps, "warmup": warmup,
        "compile": flags,
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "load_average_before": load_before,
        "other_load": others,
        "step_ms": step, "tokens_per_s": tok_s, "step_ms_all": ms,
        "losses": [timed[s][0] for s in range(1, total_steps + 1)],
        "flops_per_token": flops, "gflop_per_step": flops["total"] * tokens_per_step / 1e9,
        "achieved_gflops": achieved,
        "peak_gflops": peak, "peak_kind": "FMA peak: vector fused multiply-adds on registers (bench_gpt2 peak)",
        "sgemm_gflops": sgemm, "sgemm_size": SGEMM_SIZE,
        "mfu": achieved / peak,
    }


def format_report(r: dict) -> str:
    s, t, f = r["step_ms"], r["tokens_per_s"], r["flops_per_token"]
    return "\n".join([
        f"llmgen bench {r['spec']}: B={r['B']}, T={r['T']}, {r['threads']} threads, "
        f"{r['steps']} steps after {r['warmup']} warm-up",
        f"build:     {r['compile']}",
        f"machine:   {r['cpus']} CPUs ({r['cpu']}), load average {r['load_average_before']:.2f} before; "
        + ("other processes' load not known" if r["other_load"] is None else
           f"other processes used {100 * r['other_load']:.0f}% of the CPU time during the run"),
        f"step:      median {s['median']:,.1f} ms (min {s['min']:,.1f}, max {s['max']:,.1f})",
        f"tokens/s:  median {t['median']:,.1f} (min {t['min']:,.1f}, max {t['max']:,.1f})",
        f"FLOPs:     {f['total'] / 1e6:,.1f} M per token (matmuls {f['matmul'] / 1e6:,.1f} M = 6 x weights, "
        f"attention {f['attention'] / 1e6:,.1f} M = 6LC(T+1)); {r['gflop_per_step']:,.1f} GFLOP per step",
        f"achieved:  {r['achieved_gflops']:,.1f} GFLOP/s",
        f"peak:      {r['peak_gflops']:,.1f} GFLOP/s, the FMA peak (bench_gpt2 peak: register-only vector FMAs, "
        f"{r['threads']} threads)",
        f"sgemm:     {r['sgemm_gflops']:,.1f} GFLOP/s, the trainer's matmul_forward on "
        f"{r['sgemm_size']}x{r['sgemm_size']}x{r['sgemm_size']} ({100 * r['sgemm_gflops'] / r['peak_gflops']:.0f}% of peak)",
        f"MFU:       {100 * r['mfu']:.1f}% of the FMA peak",
    ])


def write_json(path: str | Path, result: dict) -> None:
    write_atomic(Path(path), [(json.dumps(result, indent=2) + "\n").encode()])
