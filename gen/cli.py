"""The llmgen command line."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from . import __version__
from . import spec as specs
from .errors import LlmgenError
from .prepare import SHARD_TOKENS, VAL_FRACTION
from .tensors import num_act_grads, num_acts, num_params

MIB = 1024 * 1024
DEFAULT_SPEC = "gpt2-124m"


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


def spec_options(f=None, *, default=DEFAULT_SPEC):
    """--spec or --spec-from, plus the size overrides, turned into one checked Spec argument.

    --spec-from takes the sizes from an llm.c model checkpoint's header. Given with it, --spec
    and the overrides must describe the same sizes (then --spec names the model); any
    difference is an error that lists the differing fields.
    """
    if f is None:  # used as @spec_options(default=...)
        return functools.partial(spec_options, default=default)

    @click.option("--spec", "spec_name", metavar="NAME",
                  help=f"preset ({', '.join(specs.preset_names())}) or path to a TOML spec file "
                       f"[default: {default}]")
    @click.option("--spec-from", "spec_from", metavar="CKPT", type=click.Path(dir_okay=False),
                  help="take the sizes from an llm.c model checkpoint (version 3 or 5); "
                       "--spec and overrides given too must agree with it")
    @click.option("--layers", type=int, help="override: number of transformer blocks")
    @click.option("--heads", type=int, help="override: attention heads")
    @click.option("--channels", type=int, help="override: embedding channels")
    @click.option("--vocab-size", type=int, help="override: vocabulary size (padding re-derived)")
    @click.option("--max-seq-len", type=int, help="override: longest sequence")
    @functools.wraps(f)
    def wrapper(spec_name, spec_from, layers, heads, channels, vocab_size, max_seq_len, **kwargs):
        overrides = dict(layers=layers, heads=heads, channels=channels, vocab_size=vocab_size,
                         max_seq_len=max_seq_len)
        if spec_from is None:
            spec = specs.load(spec_name or default).with_overrides(**overrides)
        else:
            from .fileio import read_model_spec
            spec, _ = read_model_spec(spec_from)
            given = (specs.load(spec_name) if spec_name else spec).with_overrides(**overrides)
            diff = specs.differences(spec, given)
            if diff:
                flags = [f"--spec {spec_name}"] if spec_name else []
                flags += [f"--{k.replace('_', '-')} {v}" for k, v in overrides.items() if v is not None]
                raise LlmgenError(f"{spec_from}: the checkpoint's sizes differ from {' '.join(flags)} "
                                  f"(checkpoint vs given): {diff}")
            if spec_name:
                spec = given
        return f(spec=spec, **kwargs)
    return wrapper


def cuda_options(f):
    """--precision and --matmul, which choose the CUDA trainer's variant."""
    f = click.option("--matmul", type=click.Choice(["cublaslt", "tiled"]), default="cublaslt", show_default=True,
                     help="CUDA matmuls: cuBLASLt, or a readable tiled shared-memory kernel")(f)
    return click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
                        help="CUDA parameters and activations (bf16 keeps fp32 master weights and AdamW state)")(f)


@cli.command()
@spec_options
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="output dir [default: build/SPEC]")
@click.option("--target", type=click.Choice(["c", "cuda", "all"]), default="c", show_default=True,
              help="c: train_gpt2.c; cuda: train_gpt2.cu; all: both")
@cuda_options
@click.option("--build/--no-build", default=False, help="also compile it with make")
def emit(spec, out_dir, target, precision, matmul, build):
    """Write train_gpt2.c (or .cu), its test harness and a Makefile for a spec."""
    from .emit import emit as emit_files, make
    out = Path(out_dir or Path("build") / spec.name)
    for path in emit_files(spec, out, target, precision, matmul):
        click.echo(f"wrote {path}")
    if build:
        for program in {"c": ["train_gpt2"], "cuda": ["train_gpt2cu"], "all": ["train_gpt2", "train_gpt2cu"]}[target]:
            click.echo(f"built {make(out, program)}")


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
@click.option("--target", type=click.Choice(["c", "cuda"]), default="c", show_default=True,
              help="the C trainer, or the CUDA one (needs an NVIDIA GPU)")
@cuda_options
def verify(spec, batch, seq_len, steps, accum, threads, seed, build_dir, target, precision, matmul):
    """Build the emitted C (or CUDA) and compare it with the NumPy reference."""
    from .verify import format_table, verify as run_verify
    if batch <= 0 or steps <= 0 or accum <= 0 or threads <= 0:
        raise LlmgenError("-b, --steps, --accum and --threads must be positive")
    T = seq_len or min(spec.max_seq_len, 16)
    rows = run_verify(spec, B=batch, T=T, steps=steps, accum=accum, seed=seed,
                      build_dir=build_dir, threads=threads, target=target, precision=precision, matmul=matmul)
    click.echo(format_table(spec, rows, batch, T, target, precision))
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


@data.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", type=click.Path(), default="build/data",
              show_default=True, help="output dir for the shards")
@click.option("--val-fraction", type=float, help=f"share of the tokens for val  [default: {VAL_FRACTION}]")
@click.option("--val-tokens", type=int, help="val tokens, instead of a fraction")
@click.option("--shard-tokens", type=int, default=SHARD_TOKENS, show_default=True, help="most tokens per shard")
@click.option("--encoding-errors", type=click.Choice(["strict", "replace"]), default="strict", show_default=True,
              help="text that is not UTF-8: an error, or replaced by U+FFFD")
@click.option("--threads", type=int, help="tokenizer threads  [default: the cores, at most 8]")
def prepare(inputs, out_dir, val_fraction, val_tokens, shard_tokens, encoding_errors, threads):
    """Tokenize text files or folders into llm.c token shards.

    INPUTS are text files, folders of them, or `shakespeare` for the corpus that ships
    with llmgen. Each file is a document, started by <|endoftext|>. The first tokens go to
    val_000000.bin..., the rest to train_000000.bin...; gpt2_tokenizer.bin (for the
    trainer's -T flag) is written beside them.
    """
    from .prepare import prepare as run_prepare
    if threads is not None and threads <= 0:
        raise LlmgenError(f"--threads {threads}: must be positive")
    r = run_prepare(list(inputs), out_dir, val_fraction=val_fraction, val_tokens=val_tokens,
                    shard_tokens=shard_tokens, errors=encoding_errors, threads=threads)
    click.echo(f"{r.documents:,} document{'s' if r.documents != 1 else ''}, {r.input_bytes / MIB:,.1f} MiB of text: "
               f"{r.tokens:,} tokens ({r.train_tokens:,} train, {r.val_tokens:,} val) in {len(r.shards)} "
               f"shard{'s' if len(r.shards) != 1 else ''} in {out_dir}")
    click.echo(f"tokenized at {r.rate / 1e6:,.2f}M tokens/s ({r.threads} threads)")


@data.command()
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), default="gpt2_tokenizer.bin",
              show_default=True)
def tokenizer(out_path):
    """Write GPT-2's tokenizer in llm.c's format, for the trainer's -T flag."""
    from .tokenizer import write_c_tokenizer
    click.echo(f"wrote {write_c_tokenizer(out_path)}")


@cli.command()
@spec_options(default="gpt2-tiny")
@click.option("--data", "inputs", multiple=True, default=["shakespeare"], show_default=True,
              help="text file or folder to train on (repeat for more); `shakespeare` ships with llmgen")
@click.option("--steps", type=int, default=700, show_default=True, help="optimizer steps")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="build/quickstart",
              show_default=True, help="dir for the trainer, the data, the log and the checkpoint")
@click.option("-b", "batch", type=int, default=8, show_default=True, help="batch size B")
@click.option("-t", "seq_len", type=int, default=64, show_default=True, help="sequence length T")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="peak learning rate (cosine decay to 10%)")
@click.option("--warmup", type=int, default=20, show_default=True, help="learning rate warmup steps")
@click.option("--val-every", type=int, default=175, show_default=True, help="val loss every this many steps")
@click.option("--sample-tokens", type=int, default=200, show_default=True, help="tokens in the final sample")
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--threads", type=int, help="OpenMP threads  [default: all cores]")
def train(spec, inputs, steps, out_dir, batch, seq_len, lr, warmup, val_every, sample_tokens, temperature,
          top_k, seed, threads):
    """Train a small GPT-2 on text and print what it writes: the whole job in one command.

    Emits and builds the trainer, tokenizes the text (the embedded Shakespeare by default),
    trains while printing the loss, and ends with a sample. A second run reuses the build and
    the data unless the spec or the text changed. Needs no network.
    """
    from .run import train as run_train
    r = run_train(spec, list(inputs), out_dir, steps=steps, batch=batch, seq_len=seq_len, lr=lr, warmup=warmup,
                  sample_tokens=sample_tokens, temperature=temperature, top_k=top_k, seed=seed,
                  val_every=val_every, threads=threads, echo=click.echo)
    val = f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "n/a"
    click.echo(f"done in {r.seconds:.0f} s: final val loss {val}; checkpoint {r.checkpoint}")
    if r.report is not None:
        click.echo(f"report: {r.report}")
    else:
        from .report import INSTALL_HINT, have_matplotlib
        if not have_matplotlib():
            click.echo(f"report: {INSTALL_HINT} for plots of this run (then: llmgen report {r.checkpoint.parent})")
    click.echo(f"more text: llmgen sample --checkpoint {r.checkpoint} --prompt \"ROMEO:\"")


@cli.command()
@click.option("--checkpoint", "-c", required=True, type=click.Path(dir_okay=False),
              help="model checkpoint (llm.c format) with GPT-2's vocab")
@click.option("--prompt", "-p", default="", help="text the sample continues  [default: none]")
@click.option("-n", "tokens", type=int, default=200, show_default=True, help="tokens to generate")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0: always the most likely token")
@click.option("--top-k", type=int, default=40, show_default=True, help="0: all tokens")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--build-dir", type=click.Path(file_okay=False),
              help="where to build the sampler  [default: build/sampler-SIZES]")
@click.option("--threads", type=int, help="OpenMP threads  [default: all cores]")
def sample(checkpoint, prompt, tokens, temperature, top_k, seed, build_dir, threads):
    """Continue a prompt with a trained checkpoint, printing the text as it comes."""
    from .run import sample as run_sample
    run_sample(checkpoint, prompt, tokens, temperature=temperature, top_k=top_k, seed=seed,
               build_dir=build_dir, threads=threads)


@cli.command("import-hf")
@click.argument("source", metavar="DIR_OR_FILE", type=click.Path())
@click.option("-o", "--out", "out_path", required=True, type=click.Path(),
              help="the llm.c model checkpoint to write")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="checkpoint version 3 (fp32) or 5 (bf16, rounded to nearest even)")
@click.option("--heads", type=int, help="attention heads, when there is no config.json [default: channels / 64]")
@click.option("--padded-vocab-size", type=int,
              help="pad the vocab to this [default: as an llmgen export recorded it, else a multiple of 128]")
def import_hf(source, out_path, dtype, heads, padded_vocab_size):
    """A Hugging Face GPT-2 (model.safetensors in transformers' layout, with its config.json
    when present) to an llm.c model checkpoint; prints the spec."""
    from .fileio import DTYPE_VERSIONS, write_model
    from .hf import import_hf as read_hf
    spec, params, notes = read_hf(source, heads=heads, padded_vocab_size=padded_vocab_size,
                                  name=Path(out_path).stem)
    version = DTYPE_VERSIONS[dtype]
    write_model(out_path, spec, params, version)
    for note in notes:
        click.echo(note)
    click.echo(f"wrote {out_path}: llm.c model checkpoint version {version} ({dtype}), "
               f"{num_params(spec.dims):,} parameters, vocab {spec.vocab_size} padded to {spec.padded_vocab_size}")
    click.echo(f"spec (a trainer for it: llmgen emit --spec-from {out_path}):")
    click.echo(spec.to_toml(), nl=False)


@cli.command("export-hf")
@click.argument("checkpoint", metavar="CKPT", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="dir for model.safetensors and config.json")
def export_hf(checkpoint, out_dir):
    """An llm.c model checkpoint to model.safetensors and config.json that transformers'
    GPT2LMHeadModel loads; the padded vocab rows are dropped."""
    from .fileio import MODEL_VERSIONS, read_model
    from .hf import export_hf as write_hf
    spec, params, version = read_model(checkpoint, with_version=True)
    padding = params["wte"][spec.vocab_size:]
    model, config = write_hf(spec, params, out_dir)
    click.echo(f"read {checkpoint}: version {version} ({MODEL_VERSIONS[version][0]}), {spec.n_layer} layers, "
               f"{spec.n_head} heads, {spec.n_embd} channels, vocab {spec.vocab_size}, max_seq_len {spec.max_seq_len}")
    if padding.size:
        state = "all zero" if not padding.any() else "not zero: importing back gives zeros there"
        click.echo(f"dropped the {padding.shape[0]} padded vocab rows of wte ({state}; the model never uses them)")
    click.echo(f"wrote {model} (float32) and {config} (GPT2LMHeadModel)")


@cli.command()
def presets():
    """List the preset specs."""
    for name in specs.preset_names():
        s = specs.load(name)
        n = num_params(s.dims)
        click.echo(f"{name:<12} layers {s.n_layer:>2}  heads {s.n_head:>2}  channels {s.n_embd:>4}  "
                   f"vocab {s.vocab_size:>5}  max_seq_len {s.max_seq_len:>4}  {n / 1e6:8.2f}M parameters")


@cli.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path())
@click.option("--log-scale", is_flag=True, help="logarithmic loss axes")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="dir for report.html and report.png  [default: the first RUN_DIR]")
def report(run_dirs, log_scale, out_dir):
    """Plot training runs from their main.log: report.png and a self-contained report.html.

    Loss against step and tokens, learning rate, gradient norm and speed, with a table of
    figures. Several RUN_DIRs are overlaid, one colour each. Needs matplotlib
    (pip install "llmgen[report]").
    """
    from .report import summary_line, write_report
    r = write_report(run_dirs, out_dir, log_scale=log_scale)
    for note in r.notes:
        click.echo(f"note: {note}")
    for s in r.summaries:
        click.echo(summary_line(s))
    click.echo(f"wrote {r.html} and {r.png}")


def main():
    cli()
