"""Running the emitted trainer for the user: `llmgen train` (the quickstart) and `llmgen sample`.

Both emit and build the C trainer for the spec (make rebuilds only what changed), and talk
to it through its flags; text goes in through tiktoken and comes out through its -T
tokenizer file.
"""

from __future__ import annotations

import os
import sys
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import edited
from .emit import emit, make
from .errors import LlmgenError
from .fileio import read_model_spec
from .prepare import SHARD_TOKENS, TOKENIZER_FILE, VAL_FRACTION, find_sources, is_prepared, prepare
from .spec import Spec
from .tokenizer import EOT_TOKEN, VOCAB_SIZE, gpt2, write_c_tokenizer
from .trainer_output import parse_step, parse_val

Echo = Callable[[str], None]


def build_trainer(spec: Spec, out_dir: Path) -> Path:
    """Emit the trainer for spec into out_dir and build it (files and binary are only
    rewritten when they change, so a second call with the same spec does nothing)."""
    emit(spec, out_dir)
    return make(out_dir)


def _need_gpt2_vocab(spec: Spec, what: str) -> None:
    if spec.vocab_size != VOCAB_SIZE:
        raise LlmgenError(f"{what}: vocab {spec.vocab_size} is not GPT-2's {VOCAB_SIZE}, so GPT-2's tokenizer "
                          "cannot turn text into its tokens")


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def sample(checkpoint: str | Path, prompt: str, tokens: int, *, temperature: float, top_k: int, seed: int,
           build_dir: str | Path | None = None, threads: int | None = None, batch: int = 1) -> None:
    """Print the prompt and `tokens` sampled tokens after it, as they come, for each of `batch`
    samples (drawn together, the prompt run once; the first streams, the others follow it,
    each after a line ---); then the speed on stderr."""
    spec, _ = read_model_spec(checkpoint)
    _need_gpt2_vocab(spec, str(checkpoint))
    if tokens < 0 or temperature < 0 or top_k < 0 or batch < 1:
        raise LlmgenError("-n, --temperature and --top-k must not be negative, --batch at least 1")
    # the trainer depends only on the sizes: one build per size, shared by checkpoints
    sizes = f"{spec.n_layer}l-{spec.n_head}h-{spec.n_embd}c-{spec.vocab_size}v-{spec.max_seq_len}t"
    out = Path(build_dir or Path("build") / f"sampler-{sizes}")
    exe = build_trainer(spec, out)
    tokenizer = out / TOKENIZER_FILE
    if not tokenizer.exists():
        write_c_tokenizer(tokenizer)
    ids = [EOT_TOKEN] + gpt2().encode_ordinary(prompt)
    cmd = [str(exe.resolve()), "-e", str(checkpoint), "-x", "0", "-v", "0", "-b", "1", "-t", str(spec.max_seq_len),
           "-g", str(tokens), "-T", str(tokenizer), "-P", ",".join(map(str, ids)), "-K", str(top_k),
           "-R", str(temperature), "-S", str(seed), "-N", str(batch)]
    # the text streams straight to our stdout; the trainer's notes go to stderr, kept for errors
    result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, env=_env(threads))
    if result.returncode != 0:
        raise LlmgenError(f"sampling failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    speed = [line for line in result.stderr.splitlines() if line.startswith("generated ")]
    if speed:
        print(speed[-1], file=sys.stderr)


@dataclass
class TrainResult:
    seconds: float
    final_val_loss: float | None
    final_train_loss: float | None
    checkpoint: Path
    sample: str
    report: Path | None = None  # run_dir/report.html, None without matplotlib


def train(spec: Spec, inputs: list[str], out_dir: str | Path, *, steps: int, batch: int, seq_len: int,
          lr: float, warmup: int, sample_tokens: int, temperature: float, top_k: int, seed: int,
          val_every: int, threads: int | None, echo: Echo, trainer: str | Path | None = None) -> TrainResult:
    """Emit and build the trainer (or build `trainer`, an edited train_gpt2.c for spec),
    prepare the data (both reused when unchanged), train, print the losses as they fall and
    the val loss, and end with a sample of text."""
    t0 = time.perf_counter()
    _need_gpt2_vocab(spec, f"spec {spec.name}")
    if steps <= 0 or batch <= 0 or warmup < 0 or sample_tokens < 0 or val_every <= 0:
        raise LlmgenError("--steps, -b and --val-every must be positive; --warmup and --sample-tokens not negative")
    if not 1 <= seq_len <= spec.max_seq_len:
        raise LlmgenError(f"-t {seq_len}: must be between 1 and the spec's max_seq_len {spec.max_seq_len}")
    find_sources(inputs)  # a missing input fails now, not after the build
    out = Path(out_dir)

    trainer_dir = out / "trainer"
    if trainer is None:
        echo(f"[1/3] trainer for {spec.name} in {trainer_dir}")
        exe = build_trainer(spec, trainer_dir)
    else:
        echo(f"[1/3] trainer: {trainer} (edited, for {spec.name}), built in {trainer_dir}")
        emit(spec, trainer_dir)
        edited.install(Path(trainer), trainer_dir / "train_gpt2.c")
        exe = edited.make(trainer_dir, "train_gpt2", Path(trainer))

    data_dir = out / "data"
    settings = {"val_fraction": VAL_FRACTION, "val_tokens": None, "shard_tokens": SHARD_TOKENS, "errors": "strict"}
    if is_prepared(inputs, data_dir, **settings):
        echo(f"[2/3] data: reusing {data_dir} (prepared from {', '.join(inputs)})")
    else:
        r = prepare(inputs, data_dir, threads=threads, **settings)
        echo(f"[2/3] data: {r.documents:,} document{'s' if r.documents != 1 else ''}, {r.tokens:,} tokens "
             f"({r.train_tokens:,} train, {r.val_tokens:,} val) in {data_dir}")

    run_dir = out / "run"
    echo(f"[3/3] training {steps} steps of B={batch} x T={seq_len}; log and checkpoint in {run_dir}")
    cmd = [str(exe.resolve()), "-i", str(data_dir / "train_*.bin"), "-j", str(data_dir / "val_*.bin"),
           "-T", str(data_dir / TOKENIZER_FILE), "-o", str(run_dir), "-n", str(steps),
           "-b", str(batch), "-t", str(seq_len), "-x", str(steps), "-l", str(lr), "-u", str(warmup), "-q", "0.1",
           "-v", str(val_every), "-m", "10", "-s", str(steps), "-g", str(sample_tokens),
           "-K", str(top_k), "-R", str(temperature), "-S", str(seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(threads),
                            errors="replace")
    step, val_loss, train_loss = 0, None, None
    sample_lines: list[str] | None = None
    sample_text = ""
    every = max(1, steps // 10)
    for line in proc.stdout:
        line = line.rstrip("\n")
        if sample_lines is not None:            # inside a sample block, up to its closing ---
            if line == "---":
                echo("\n".join(sample_lines))
                echo("---")
                sample_text = "\n".join(sample_lines)
                sample_lines = None
            else:
                sample_lines.append(line)
        elif (parsed := parse_step(line)) is not None:
            step, train_loss = parsed.step, parsed.loss
            if step == 1 or step % every == 0 or step == steps:
                echo(line)
        elif (parsed_val := parse_val(line)) is not None:
            val_loss = parsed_val
            echo(f"val loss {val_loss:.4f} after {step} step{'s' if step != 1 else ''}")
        elif line == "---":
            sample_lines = []
        elif line.startswith("generating:"):
            echo(f"sample after {step} steps (temperature {temperature}, top-k {top_k}):\n---")
        elif line.startswith(("model ", "train ", "val ")):
            echo("  " + line)
    proc.wait()
    if proc.returncode != 0:
        err = proc.stderr.read().strip()
        raise LlmgenError(f"training failed: {err.splitlines()[-1] if err else f'exit status {proc.returncode}'}")
    from .report import have_matplotlib, write_report
    report = None
    if have_matplotlib():
        try:
            report = write_report([run_dir]).html
        except LlmgenError as e:  # the run itself is done: say why, and keep its results
            echo(f"report not written: {e}")
    return TrainResult(seconds=time.perf_counter() - t0, final_val_loss=val_loss, final_train_loss=train_loss,
                       checkpoint=run_dir / f"model_{steps:08d}.bin", sample=sample_text, report=report)
