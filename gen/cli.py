"""The llmgen command line."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from . import __version__
from . import spec as specs
from .errors import LlmgenError
from .tensors import num_act_grads, num_acts, num_params

MIB = 1024 * 1024


class Group(click.Group):
    """Turns a user mistake (LlmgenError) into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlmgenError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmgen")
def cli():
    """llmgen: generate readable, standalone GPT-2 training programs from a model spec."""


def spec_options(f):
    """--spec plus the size overrides, turned into one checked Spec argument."""
    @click.option("--spec", "spec_name", default="gpt2-124m", show_default=True,
                  help=f"preset ({', '.join(specs.preset_names())}) or path to a TOML spec file")
    @click.option("--layers", type=int, help="override: number of transformer blocks")
    @click.option("--heads", type=int, help="override: attention heads")
    @click.option("--channels", type=int, help="override: embedding channels")
    @click.option("--vocab-size", type=int, help="override: vocabulary size (padding re-derived)")
    @click.option("--max-seq-len", type=int, help="override: longest sequence")
    @functools.wraps(f)
    def wrapper(spec_name, layers, heads, channels, vocab_size, max_seq_len, **kwargs):
        spec = specs.load(spec_name).with_overrides(layers=layers, heads=heads, channels=channels,
                                                    vocab_size=vocab_size, max_seq_len=max_seq_len)
        return f(spec=spec, **kwargs)
    return wrapper


@cli.command()
@spec_options
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="output dir [default: build/SPEC]")
@click.option("--build/--no-build", default=False, help="also compile it with make")
def emit(spec, out_dir, build):
    """Write train_gpt2.c, its test harness and a Makefile for a spec."""
    from .emit import emit as emit_files, make
    out = Path(out_dir or Path("build") / spec.name)
    for path in emit_files(spec, out):
        click.echo(f"wrote {path}")
    if build:
        click.echo(f"built {make(out)}")


@cli.command()
@spec_options
@click.option("-b", "batch", type=int, default=4, show_default=True, help="micro-batch size B")
@click.option("-t", "seq_len", type=int, help="sequence length T [default: the spec's max_seq_len]")
def info(spec, batch, seq_len):
    """Parameter count, memory and FLOPs of a spec."""
    T = seq_len or spec.max_seq_len
    if batch <= 0 or T <= 0 or T > spec.max_seq_len:
        raise LlmgenError(f"-b {batch} -t {T}: need B >= 1 and 1 <= T <= max_seq_len {spec.max_seq_len}")
    dims = spec.dims
    n = num_params(dims)
    n_unpadded = num_params({**dims, "Vp": spec.vocab_size})
    acts = num_acts({**dims, "B": batch, "T": T})
    act_grads = num_act_grads({**dims, "B": batch, "T": T})
    L, C = spec.n_layer, spec.n_embd
    flops = 6 * n + 6 * L * C * T
    rows = [("parameters", n), ("gradients", n), ("AdamW m and v", 2 * n),
            (f"activations (B={batch}, T={T})", acts), ("activation gradients", act_grads)]
    click.echo(f"{spec.name} ({spec.source})")
    click.echo(f"  {L} layers, {spec.n_head} heads of {spec.head_size}, {C} channels, "
               f"vocab {spec.vocab_size} padded to {spec.padded_vocab_size}, max_seq_len {spec.max_seq_len}")
    click.echo(f"parameters: {n_unpadded:,} ({n:,} with the padded vocab)")
    click.echo("memory of the C trainer (fp32):")
    for name, floats in rows:
        click.echo(f"  {name:<32} {floats * 4 / MIB:>12,.1f} MiB")
    click.echo(f"  {'total':<32} {sum(f for _, f in rows) * 4 / MIB:>12,.1f} MiB")
    click.echo(f"training FLOPs per token: {flops:,} (6N + 6LCT at T={T}; "
               f"{flops * batch * T / 1e9:,.1f} GFLOP per step of B*T tokens)")


@cli.command()
@spec_options
@click.option("-b", "batch", type=int, default=2, show_default=True, help="micro-batch size B")
@click.option("-t", "seq_len", type=int, help="sequence length T [default: min(max_seq_len, 16)]")
@click.option("--steps", type=int, default=10, show_default=True, help="AdamW steps to compare")
@click.option("--accum", type=int, default=2, show_default=True, help="micro-batches per step")
@click.option("--threads", type=int, default=2, show_default=True, help="OpenMP threads")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--build-dir", type=click.Path(file_okay=False), help="[default: build/verify-SPEC]")
def verify(spec, batch, seq_len, steps, accum, threads, seed, build_dir):
    """Build the emitted C and compare it with the NumPy reference."""
    from .verify import format_table, verify as run_verify
    if batch <= 0 or steps <= 0 or accum <= 0 or threads <= 0:
        raise LlmgenError("-b, --steps, --accum and --threads must be positive")
    T = seq_len or min(spec.max_seq_len, 16)
    rows = run_verify(spec, B=batch, T=T, steps=steps, accum=accum, seed=seed,
                      build_dir=build_dir, threads=threads)
    click.echo(format_table(spec, rows, batch, T))
    if not all(r.ok for r in rows):
        raise SystemExit(1)


@cli.command()
@spec_options
@click.option("-b", "batch", type=int, default=4, show_default=True, help="micro-batch size B")
@click.option("-t", "seq_len", type=int, help="sequence length T [default: min(max_seq_len, 64)]")
@click.option("--threads", type=int, help="OpenMP threads [default: all CPUs]")
@click.option("--steps", type=int, default=10, show_default=True, help="timed steps")
@click.option("--warmup", type=int, default=2, show_default=True, help="untimed steps first")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="[default: BUILD_DIR/bench.json]")
@click.option("--build-dir", type=click.Path(file_okay=False), help="[default: build/bench-SPEC]")
def bench(spec, batch, seq_len, threads, steps, warmup, json_path, build_dir):
    """Time the emitted trainer (production build) against this machine's FMA peak."""
    from .bench import bench as run_bench, format_report, write_json
    build_dir = Path(build_dir or Path("build") / f"bench-{spec.name}")
    result = run_bench(spec, B=batch, T=seq_len or min(spec.max_seq_len, 64), threads=threads or os.cpu_count(),
                       steps=steps, warmup=warmup, build_dir=build_dir)
    json_path = Path(json_path or build_dir / "bench.json")
    write_json(json_path, result)
    click.echo(format_report(result))
    click.echo(f"wrote {json_path}")


@cli.group()
def data():
    """Make token shards in llm.c's format."""


@data.command()
@spec_options
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="build/data-synthetic",
              show_default=True)
@click.option("--tokens", type=int, default=200_000, show_default=True, help="train tokens")
@click.option("--val-tokens", type=int, default=20_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synthetic(spec, out_dir, tokens, val_tokens, seed):
    """Learnable synthetic text: a random sparse Markov chain over the spec's vocab.

    Writes train_000000.bin and val_000000.bin. A model that learns the chain's
    transitions gets its loss from ln(V) down towards the chain's entropy, which is printed.
    """
    from .synthetic import markov_tokens
    from .fileio import write_shard
    if tokens <= 0 or val_tokens <= 0:
        raise LlmgenError("--tokens and --val-tokens must be positive")
    train, val, entropy = markov_tokens(spec.vocab_size, tokens, val_tokens, seed)
    out = Path(out_dir)
    write_shard(out / "train_000000.bin", train)
    write_shard(out / "val_000000.bin", val)
    click.echo(f"wrote {out / 'train_000000.bin'} ({tokens:,} tokens) and {out / 'val_000000.bin'} "
               f"({val_tokens:,} tokens); chain entropy {entropy:.3f} nats/token")


@cli.command()
def presets():
    """List the preset specs."""
    for name in specs.preset_names():
        s = specs.load(name)
        n = num_params(s.dims)
        click.echo(f"{name:<12} layers {s.n_layer:>2}  heads {s.n_head:>2}  channels {s.n_embd:>4}  "
                   f"vocab {s.vocab_size:>5}  max_seq_len {s.max_seq_len:>4}  {n / 1e6:8.2f}M parameters")


def main():
    cli()
