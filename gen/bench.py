"""`llmgen bench`: how fast the emitted trainer trains, against this machine's own peak and,
with --compare-torch, against PyTorch eager on the same threads.

The trainer is emitted and built with the flags of its Makefile (the production build), then
run for warm-up plus N steps on synthetic token shards; its own per-step timings are parsed
from its output, and its peak memory (the largest resident set) is the operating system's
account of the finished process. In the same run, bench_gpt2 (emitted with the trainer, same
flags) says which instruction set the build uses and measures the machine's FMA peak for it,
the trainer's matmul on a 2048^3 problem, and each of the model's matmuls at the run's B*T
rows. With --compare-torch, the PyTorch model of llmgen.bench_torch runs the same steps, and
the two alternate (llmgen, torch, llmgen, torch...) so that both see the same machine.

FLOPs are counted from the spec (spec.flops_per_token), in the usual way for MFU: the matmuls and
the attention, forward and backward; elementwise work (layernorm, GELU, softmax, residuals,
AdamW) is not counted.

Targets, printed with the figures: at least 1.2x PyTorch eager's tokens/s, and at least 75% MFU
at B*T >= 1,024 tokens a step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import trainer_output
from .emit import emit, make
from .errors import LlmgenError
from .fileio import write_atomic, write_shard
from .spec import Spec, flops_per_token
from .synthetic import markov_tokens

SGEMM_SIZE = 2048  # the square matmul the trainer's own matmul_forward is timed on
TORCH_RATIO_TARGET = 1.2
MFU_TARGET, MFU_TARGET_TOKENS = 0.75, 1024
TORCH_HINT = 'PyTorch is not installed: pip install "llmgen[bench]" (or torch) to compare with it'


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


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


def _run(args: list[str], cwd: Path, threads: int, what: str) -> tuple[str, float | None, int]:
    """Run a program with OMP_NUM_THREADS. Returns its stdout, the share of the machine's CPU
    time that other processes took meanwhile (None where that cannot be read: timings taken
    on a busy machine are slower, and this says how busy it was), and its peak resident
    memory in bytes."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    busy_before = _busy_cpu_seconds()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    busy_after = _busy_cpu_seconds()
    if proc.returncode != 0:
        raise LlmgenError(f"{what} failed (exit {proc.returncode}):\n{stdout}{stderr}")
    ours = usage.ru_utime + usage.ru_stime
    others = None
    if busy_before is not None and busy_after is not None and wall > 0:
        # /proc/stat counts in clock ticks (1/100 s) and a short run can read a tick or two past
        # its wall time: a share, kept within 0 and 1
        others = min(1.0, max(0.0, busy_after - busy_before - ours) / (wall * (os.cpu_count() or 1)))
    return stdout, others, usage.ru_maxrss * 1024


def _reference(exe: Path, args: list[str], threads: int) -> list[str]:
    """The fields of bench_gpt2's one line of output, after its name."""
    out, _, _ = _run([str(exe.resolve()), *args], exe.parent, threads, f"{exe.name} {' '.join(args)}")
    return out.split()[1:]


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


def _torch_run(spec: Spec, B: int, T: int, threads: int, steps: int) -> tuple[list[float], int, str]:
    args = [sys.executable, "-m", "llmgen.bench_torch", *map(str, (spec.n_layer, spec.n_head, spec.n_embd,
            spec.padded_vocab_size, spec.max_seq_len, B, T, threads, steps))]
    out, _, rss = _run(args, Path.cwd(), threads, "the PyTorch comparison (llmgen.bench_torch)")
    r = json.loads(out.strip().splitlines()[-1])
    return r["step_ms"], max(rss, r["peak_rss_bytes"]), r["torch"]


def bench(spec: Spec, B: int, T: int, threads: int, steps: int, warmup: int,
          build_dir: str | Path | None = None, compare_torch: bool = False, rounds: int = 1) -> dict:
    if B <= 0 or T <= 0 or T > spec.max_seq_len:
        raise LlmgenError(f"-b {B} -t {T}: need B >= 1 and 1 <= T <= max_seq_len {spec.max_seq_len}")
    if steps <= 0 or warmup < 0 or threads <= 0 or rounds <= 0:
        raise LlmgenError("--steps, --threads and --rounds must be positive and --warmup not negative")
    if compare_torch and not torch_available():
        raise LlmgenError(TORCH_HINT)
    build_dir = Path(build_dir or Path("build") / f"bench-{spec.name}")
    emit(spec, build_dir)
    exe = make(build_dir, "train_gpt2")
    ref_exe = make(build_dir, "bench_gpt2")
    flags = compile_command(build_dir, "train_gpt2")

    load_before = os.getloadavg()[0]
    isa = _reference(ref_exe, ["isa"], threads)

    def measure_peak() -> float:
        return float(_reference(ref_exe, ["peak"], threads)[0])
    peaks = [measure_peak()]  # and again after the run, below
    sgemm = float(_reference(ref_exe, ["matmul", str(SGEMM_SIZE)], threads)[0])
    fields = _reference(ref_exe, ["products", str(B * T)], threads)
    products = {fields[i]: {"forward": float(fields[i + 1]), "backward": float(fields[i + 2])}
                for i in range(0, len(fields), 3)}

    total_steps = warmup + steps
    ms, losses, rss, torch_ms, torch_rss, torch_version, others = [], [], 0, [], 0, None, []
    with tempfile.TemporaryDirectory(prefix="llmgen-bench-") as tmp:
        tokens, _, _ = markov_tokens(spec.vocab_size, total_steps * B * T + 1, 1, seed=0)
        write_shard(Path(tmp) / "train_000000.bin", tokens)
        args = [str(exe.resolve()), "-i", str(Path(tmp) / "train_*.bin"), "-b", str(B), "-t", str(T),
                "-x", str(total_steps), "-v", "0", "-s", "0"]
        for _ in range(rounds):  # llmgen, then torch, in turn
            out, other, run_rss = _run(args, Path(tmp), threads, f"{exe}")
            timed = {n: (st.loss, st.ms) for n, st in trainer_output.steps(out).items()}
            if sorted(timed) != list(range(1, total_steps + 1)):
                raise LlmgenError(f"{exe}: expected {total_steps} step lines in its output, got:\n{out}")
            ms += [timed[st][1] for st in range(warmup + 1, total_steps + 1)]
            losses = [timed[st][0] for st in range(1, total_steps + 1)]
            rss = max(rss, run_rss)
            others.append(other)
            if compare_torch:
                t_ms, t_rss, torch_version = _torch_run(spec, B, T, threads, total_steps)
                torch_ms += t_ms[warmup:]
                torch_rss = max(torch_rss, t_rss)
    # The peak is measured before and after the timed runs and the better one counts: on a machine
    # shared with others (a virtual CPU whose sibling core is busy), one measurement taken at a
    # busy moment would understate the peak and overstate the MFU.
    peaks.append(measure_peak())
    peak = max(peaks)
    tokens_per_step = B * T
    flops = flops_per_token(spec, T)
    step = _stats(ms)
    tok_s = {"median": tokens_per_step / (step["median"] / 1e3), "min": tokens_per_step / (step["max"] / 1e3),
             "max": tokens_per_step / (step["min"] / 1e3)}
    achieved = flops["total"] * tok_s["median"] / 1e9
    result = {
        "spec": spec.name, "B": B, "T": T, "threads": threads, "steps": steps, "warmup": warmup, "rounds": rounds,
        "compile": flags,
        "isa": {"name": isa[0], "vector_floats": int(isa[1]), "registers": int(isa[2]), "peak_chains": int(isa[3]),
                "tile": [int(isa[4]), int(isa[5])]},
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "load_average_before": load_before,
        "other_load": None if None in others else max(others),
        "step_ms": step, "tokens_per_s": tok_s, "step_ms_all": ms,
        "losses": losses, "peak_rss_bytes": rss,
        "flops_per_token": flops, "gflop_per_step": flops["total"] * tokens_per_step / 1e9,
        "achieved_gflops": achieved,
        "peak_gflops": peak, "peak_gflops_runs": peaks, "peak_kind": "FMA peak: vector fused multiply-adds on registers (bench_gpt2 peak)",
        "sgemm_gflops": sgemm, "sgemm_size": SGEMM_SIZE, "products_gflops": products,
        "mfu": achieved / peak,
        "mfu_target": MFU_TARGET if B * T >= MFU_TARGET_TOKENS else None,
    }
    if compare_torch:
        t_step = _stats(torch_ms)
        result["torch"] = {"version": torch_version, "step_ms": t_step, "step_ms_all": torch_ms,
                           "tokens_per_s": tokens_per_step / (t_step["median"] / 1e3), "peak_rss_bytes": torch_rss,
                           "speedup": t_step["median"] / step["median"], "speedup_target": TORCH_RATIO_TARGET}
    return result


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def format_report(r: dict) -> str:
    s, t, f, isa = r["step_ms"], r["tokens_per_s"], r["flops_per_token"], r["isa"]
    lines = [
        f"llmgen bench {r['spec']}: B={r['B']}, T={r['T']}, {r['threads']} threads, "
        f"{r['steps']} steps after {r['warmup']} warm-up" + (f", {r['rounds']} rounds" if r["rounds"] > 1 else ""),
        f"build:     {r['compile']}",
        f"isa:       {isa['name']} ({isa['vector_floats']} floats a vector, {isa['registers']} vector registers): "
        f"gemm tile {isa['tile'][0]} x {isa['tile'][1]}, peak kernel {isa['peak_chains']} chains",
        f"machine:   {r['cpus']} CPUs ({r['cpu']}), load average {r['load_average_before']:.2f} before; "
        + ("other processes' load not known" if r["other_load"] is None else
           f"other processes used {100 * r['other_load']:.0f}% of the CPU time during the run"),
        f"step:      median {s['median']:,.1f} ms (min {s['min']:,.1f}, max {s['max']:,.1f})",
        f"tokens/s:  median {t['median']:,.1f} (min {t['min']:,.1f}, max {t['max']:,.1f})",
        f"memory:    peak {r['peak_rss_bytes'] / 1e9:,.2f} GB resident",
        f"FLOPs:     {f['total'] / 1e6:,.1f} M per token (matmuls {f['matmul'] / 1e6:,.1f} M = 6 x weights, "
        f"attention {f['attention'] / 1e6:,.1f} M = 6LC(T+1)); {r['gflop_per_step']:,.1f} GFLOP per step",
        f"achieved:  {r['achieved_gflops']:,.1f} GFLOP/s",
        f"peak:      {r['peak_gflops']:,.1f} GFLOP/s, the FMA peak (bench_gpt2 peak: register-only vector FMAs, "
        f"{r['threads']} threads; the better of before and after the run: "
        + " / ".join(f"{p:,.1f}" for p in r["peak_gflops_runs"]) + ")",
        f"sgemm:     {r['sgemm_gflops']:,.1f} GFLOP/s, the trainer's matmul_forward on "
        f"{r['sgemm_size']}x{r['sgemm_size']}x{r['sgemm_size']} ({100 * r['sgemm_gflops'] / r['peak_gflops']:.0f}% of peak)",
        "matmuls:   GFLOP/s forward / backward at B*T = " + f"{r['B'] * r['T']:,} rows: " + ", ".join(
            f"{name} {p['forward']:,.0f} / {p['backward']:,.0f}" for name, p in r["products_gflops"].items()),
    ]
    mfu = f"MFU:       {100 * r['mfu']:.1f}% of the FMA peak"
    if r["mfu_target"] is not None:
        mfu += f" (target at least {100 * r['mfu_target']:.0f}% at B*T >= {MFU_TARGET_TOKENS:,}: " \
               f"{_met(r['mfu'] >= r['mfu_target'])})"
    lines.append(mfu)
    if "torch" in r:
        tr = r["torch"]
        lines += [
            f"torch:     PyTorch {tr['version']} eager, same model and threads: median {tr['step_ms']['median']:,.1f} ms "
            f"(min {tr['step_ms']['min']:,.1f}, max {tr['step_ms']['max']:,.1f}), {tr['tokens_per_s']:,.1f} tokens/s, "
            f"peak {tr['peak_rss_bytes'] / 1e9:,.2f} GB resident",
            f"vs torch:  {tr['speedup']:.2f}x its speed (target at least {tr['speedup_target']}x: "
            f"{_met(tr['speedup'] >= tr['speedup_target'])}); {r['peak_rss_bytes'] / tr['peak_rss_bytes']:.2f}x its memory",
        ]
    return "\n".join(lines)


SAMPLE_PROMPT, SAMPLE_TOKENS = 16, 256  # bench --sample: new tokens after a prompt, at batch 1


def bench_sample(spec: Spec, threads: int, build_dir: str | Path | None = None, compare_torch: bool = False,
                 rounds: int = 1, tokens: int = SAMPLE_TOKENS, prompt: int = SAMPLE_PROMPT) -> dict:
    """Generation speed at batch 1: `tokens` new tokens after a `prompt`-token prompt from a
    random-init model (the speed does not depend on the weights), tokens/s as the trainer
    prints it; against the memory-bandwidth bound (each new token reads every weight once:
    tokens/s <= bandwidth / (4 bytes x parameters)), the bandwidth measured in the same run;
    with compare_torch, against a PyTorch KV-cache loop on the same threads, in turn."""
    from .fileio import write_model
    from .reference import init_params
    from .tensors import num_params
    if compare_torch and not torch_available():
        raise LlmgenError(TORCH_HINT)
    if not 1 <= prompt + tokens:
        raise LlmgenError("--sample needs at least one token")
    # Within one window: past it the trainer refills its cache every token (and a KV-cache loop
    # in PyTorch has no positions left), which is another speed than the cache's.
    tokens = min(tokens, spec.max_seq_len - prompt)
    if tokens < 1:
        raise LlmgenError(f"--sample: a {prompt}-token prompt leaves no room in the window of "
                          f"max_seq_len {spec.max_seq_len}")
    build_dir = Path(build_dir or Path("build") / f"bench-{spec.name}")
    emit(spec, build_dir)
    exe = make(build_dir, "train_gpt2")
    ref_exe = make(build_dir, "bench_gpt2")
    bandwidth = float(_reference(ref_exe, ["bandwidth", "1000"], threads)[0])
    n = num_params(spec)
    bound = bandwidth * 1e9 / (4 * n)
    ids = ",".join(str(spec.vocab_size - 1 - i) for i in range(prompt))
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="llmgen-bench-") as tmp:
        ckpt = Path(tmp) / "model.bin"
        write_model(ckpt, spec, init_params(spec, seed=0))
        args = [str(exe.resolve()), "-e", str(ckpt), "-x", "0", "-v", "0", "-b", "1", "-t", str(spec.max_seq_len),
                "-g", str(tokens), "-P", ids, "-R", "1", "-T", str(Path(tmp) / "none"), "-S", "1"]
        env_args = args[:-4] + args[-2:]  # without -T: token ids
        for _ in range(rounds):
            _, _, _ = None, None, None
            result = subprocess.run(env_args, capture_output=True, text=True, cwd=tmp,
                                    env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            if result.returncode != 0:
                raise LlmgenError(f"{exe} -x 0 failed:\n{result.stderr}")
            line = next(x for x in result.stderr.splitlines() if x.startswith("generated "))
            ours.append(float(line.split(": ")[1].split()[0]))
            if compare_torch:
                args_t = [sys.executable, "-m", "llmgen.bench_torch", "sample", *map(str, (
                    spec.n_layer, spec.n_head, spec.n_embd, spec.padded_vocab_size, spec.max_seq_len, threads,
                    prompt, tokens))]
                out, _, _ = _run(args_t, Path(tmp), threads, "the PyTorch generation (llmgen.bench_torch sample)")
                theirs.append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
    r = {"spec": spec.name, "threads": threads, "prompt": prompt, "tokens": tokens, "rounds": rounds,
         "tokens_per_s": _stats(ours), "bandwidth_gbs": bandwidth, "parameters": n, "bound_tokens_per_s": bound,
         "cpu": _cpu_name(), "cpus": os.cpu_count()}
    if compare_torch:
        r["torch_tokens_per_s"] = _stats(theirs)
    return r


def format_sample_report(r: dict) -> str:
    t = r["tokens_per_s"]
    lines = [
        f"llmgen bench --sample {r['spec']}: {r['tokens']} new tokens after {r['prompt']}, batch 1, "
        f"{r['threads']} threads, {r['rounds']} round{'s' if r['rounds'] != 1 else ''}",
        f"machine:   {r['cpus']} CPUs ({r['cpu']})",
        f"tokens/s:  median {t['median']:,.1f} (min {t['min']:,.1f}, max {t['max']:,.1f})",
        f"bandwidth: {r['bandwidth_gbs']:,.1f} GB/s read (bench_gpt2 bandwidth: a 1 GB buffer summed)",
        f"bound:     {r['bound_tokens_per_s']:,.1f} tokens/s = bandwidth / (4 bytes x {r['parameters']:,} parameters); "
        f"{t['median'] / r['bound_tokens_per_s']:.2f} of it (target within 2x: "
        f"{_met(t['median'] >= r['bound_tokens_per_s'] / 2)})",
    ]
    if "torch_tokens_per_s" in r:
        tt = r["torch_tokens_per_s"]["median"]
        lines.append(f"torch:     a PyTorch KV-cache loop, same threads: {tt:,.1f} tokens/s; llmgen {t['median'] / tt:.2f}x "
                     f"(target at least 1x: {_met(t['median'] >= tt)})")
    return "\n".join(lines)


def write_json(path: str | Path, result: dict) -> None:
    write_atomic(Path(path), [(json.dumps(result, indent=2) + "\n").encode()])
