"""The llmgen command line. Commands are listed in the order of a workflow: train and sample
first (the quickstart), then the data, the emitted program, checking and timing it, and moving
weights in and out."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from . import __version__
from . import spec as specs
from .enums import Matmul, Mlp, Norm, Position, Precision, Target
from .errors import LlmgenError
from .prepare import SHARD_TOKENS, VAL_FRACTION
from .tensors import num_acts, num_params

MIB = 1024 * 1024
DEFAULT_SPEC = "gpt2-124m"
POSITIVE = click.IntRange(min=1)
NOT_NEGATIVE = click.IntRange(min=0)
COMMAND_ORDER = ("train", "sample", "data", "emit", "info", "presets", "verify", "bench", "report",
                 "import-hf", "export-hf")


class UserError(click.ClickException):
    """A user mistake, shown as one `error: ...` line."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class Group(click.Group):
    """Lists its commands in workflow order (COMMAND_ORDER), and turns a user mistake
    (LlmgenError) into one `error:` line on stderr and exit status 1."""

    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlmgenError as e:
            raise UserError(str(e)) from None


def _preset_help() -> str:
    return ", ".join(specs.preset_names(tests=False))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmgen")
def cli():
    """llmgen: generate readable, standalone GPT-2 training programs in C and CUDA from a
    model spec, and train them.

    Start here: llmgen train (a small GPT-2 on Shakespeare, on this machine's CPU, in about
    two minutes).
    """


def spec_options(f=None, *, default=DEFAULT_SPEC):
    """--spec or --spec-from, plus the size overrides, turned into one checked Spec argument.

    --spec-from takes the sizes from an llm.c model checkpoint's header. Given with it, --spec
    and the overrides must describe the same sizes (then --spec names the model); any
    difference is an error that lists the differing fields.
    """
    if f is None:  # used as @spec_options(default=...)
        return functools.partial(spec_options, default=default)

    @click.option("--spec", "spec_name", metavar="NAME",
                  help=f"preset ({_preset_help()}) or path to a TOML spec file  [default: {default}]")
    @click.option("--spec-from", "spec_from", metavar="CKPT", type=click.Path(dir_okay=False),
                  help="take the sizes from an llm.c model checkpoint (version 3 or 5); "
                       "--spec and overrides given too must agree with it")
    @click.option("--layers", type=POSITIVE, help="override: number of transformer blocks")
    @click.option("--heads", type=POSITIVE, help="override: attention heads")
    @click.option("--channels", type=POSITIVE, help="override: embedding channels")
    @click.option("--vocab-size", type=POSITIVE, help="override: vocabulary size (padding re-derived)")
    @click.option("--max-seq-len", type=POSITIVE, help="override: longest sequence")
    @click.option("--norm", type=click.Choice(Norm.values()), help="override: layernorm or rmsnorm")
    @click.option("--norm-eps", type=click.FloatRange(min=0, min_open=True), help="override: the norms' epsilon")
    @click.option("--position", type=click.Choice(Position.values()), help="override: learned positions or rope")
    @click.option("--rope-theta", type=click.FloatRange(min=0, min_open=True), help="override: the rotary base")
    @click.option("--mlp", type=click.Choice(Mlp.values()), help="override: the MLP's activation")
    @click.option("--mlp-hidden", type=POSITIVE, help="override: MLP hidden channels")
    @click.option("--kv-heads", type=POSITIVE, help="override: key/value heads (dividing heads)")
    @click.option("--bias/--no-bias", default=None, help="override: biases in linear layers and layernorms")
    @click.option("--tied/--untied", "tie_embeddings", default=None, help="override: the classifier is wte, or its own")
    @functools.wraps(f)
    def wrapper(spec_name, spec_from, layers, heads, channels, vocab_size, max_seq_len, norm, norm_eps, position,
                rope_theta, mlp, mlp_hidden, kv_heads, bias, tie_embeddings, **kwargs):
        overrides = dict(layers=layers, heads=heads, channels=channels, vocab_size=vocab_size,
                         max_seq_len=max_seq_len, norm=norm, norm_eps=norm_eps, position=position,
                         rope_theta=rope_theta, mlp=mlp, mlp_hidden=mlp_hidden, kv_heads=kv_heads, bias=bias,
                         tie_embeddings=tie_embeddings)
        if spec_from is None:
            spec = specs.load(spec_name or default).with_overrides(**overrides)
        else:
            from .fileio import read_model_spec
            spec, _ = read_model_spec(spec_from)
            given = (specs.load(spec_name) if spec_name else spec).with_overrides(**overrides)
            diff = specs.differences(spec, given)
            if diff:
                flags = [f"--spec {spec_name}"] if spec_name else []
                flags += [f"--{k.replace('_', '-')} {v}" for k, v in overrides.items() if v is not None]  # (as typed)
                raise LlmgenError(f"{spec_from}: the checkpoint's sizes differ from {' '.join(flags)} "
                                  f"(checkpoint vs given): {diff}")
            if spec_name:
                spec = given
        return f(spec=spec, **kwargs)
    return wrapper


SPEC_PARAMS = ("spec_name", "spec_from", "layers", "heads", "channels", "vocab_size", "max_seq_len", "norm",
               "norm_eps", "position", "rope_theta", "mlp", "mlp_hidden", "kv_heads", "bias", "tie_embeddings")


def given_on_command_line(ctx: click.Context, *names: str) -> bool:
    """Whether any of these parameters was typed (not left at its default)."""
    return any(ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
               for n in names)


def cuda_options(f):
    """--precision, --matmul, --tf32 and --recompute-gelu, which choose the CUDA trainer's variant.
    The last two reach the emitter through emit.cuda_build, for the duration of the command."""
    @functools.wraps(f)
    def wrapper(*args, tf32, recompute_gelu, **kwargs):
        from .emit import cuda_build
        with cuda_build(tf32=tf32, recompute_gelu=recompute_gelu):
            return f(*args, **kwargs)
    wrapper = click.option("--recompute-gelu/--no-recompute-gelu", default=False, show_default=True,
                           help="CUDA: keep one layer's GELU output and recompute each layer's in the backward "
                                "(less memory; as llm.c's -r 1)")(wrapper)
    wrapper = click.option("--tf32/--no-tf32", default=True, show_default=True,
                           help="CUDA fp32: cuBLASLt matmuls in TF32 on the tensor cores, or exact fp32 "
                                "(verify always builds exact fp32)")(wrapper)
    wrapper = click.option("--matmul", type=click.Choice(Matmul.values()), default=Matmul.CUBLASLT.value,
                           show_default=True,
                           help="CUDA matmuls: cuBLASLt, or a readable tiled shared-memory kernel")(wrapper)
    return click.option("--precision", type=click.Choice(Precision.values()), default=Precision.FP32.value,
                        show_default=True,
                        help="CUDA parameters and activations (bf16 keeps fp32 master weights and AdamW state)")(wrapper)


# ---- the quickstart ---------------------------------------------------------------------
@cli.command(short_help="Start here: train a small GPT-2 on text, print what it writes.")
@spec_options(default="gpt2-tiny")
@click.option("--data", "inputs", multiple=True, default=["shakespeare"], show_default=True,
              help="text file or folder to train on (repeat for more); `shakespeare` ships with llmgen")
@click.option("--steps", type=POSITIVE, default=700, show_default=True, help="optimizer steps")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="build/quickstart",
              show_default=True, help="dir for the trainer, the data, the log and the checkpoint")
@click.option("-b", "batch", type=POSITIVE, default=8, show_default=True, help="batch size B")
@click.option("-t", "seq_len", type=POSITIVE, default=64, show_default=True, help="sequence length T")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True,
              help="peak learning rate (cosine decay to 10%)")
@click.option("--warmup", type=NOT_NEGATIVE, default=20, show_default=True, help="learning rate warmup steps")
@click.option("--val-every", type=POSITIVE, default=175, show_default=True, help="val loss every this many steps")
@click.option("--sample-tokens", type=NOT_NEGATIVE, default=200, show_default=True, help="tokens in the final sample")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="sampling temperature; 0: always the most likely token")
@click.option("--top-k", type=NOT_NEGATIVE, default=40, show_default=True, help="sample from the top k tokens (0: all)")
@click.option("--seed", type=int, default=42, show_default=True, help="random seed (init and sampler)")
@click.option("--threads", type=POSITIVE, help="OpenMP threads  [default: all cores]")
@click.option("--trainer", "trainer", metavar="FILE", type=click.Path(dir_okay=False),
              help="train with this train_gpt2.c instead of a fresh one: a copy you edited, for the spec in its "
                   "header (--spec, if given, must agree)")
def train(spec, inputs, steps, out_dir, batch, seq_len, lr, warmup, val_every, sample_tokens, temperature,
          top_k, seed, threads, trainer):
    """Train a small GPT-2 on text and print what it writes: the whole job in one command.

    Emits and builds the trainer, tokenizes the text (the embedded Shakespeare by default),
    trains while printing the loss, and ends with a sample. A second run reuses the build and
    the data unless the spec or the text changed. Needs no network.
    """
    from .run import train as run_train
    if trainer is not None:
        from . import edited
        if edited.target_of(Path(trainer)) is not Target.C:
            raise LlmgenError(f"{trainer}: llmgen train runs the C trainer (train_gpt2.c); build and run a "
                              "train_gpt2.cu with its Makefile")
        ctx = click.get_current_context()
        spec = edited.spec_of(Path(trainer), spec if given_on_command_line(ctx, *SPEC_PARAMS) else None)
    r = run_train(spec, list(inputs), out_dir, steps=steps, batch=batch, seq_len=seq_len, lr=lr, warmup=warmup,
                  sample_tokens=sample_tokens, temperature=temperature, top_k=top_k, seed=seed,
                  val_every=val_every, threads=threads, echo=click.echo, trainer=trainer)
    val = f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "n/a"
    click.echo(f"done in {r.seconds:.0f} s: final val loss {val}; checkpoint {r.checkpoint}")
    if r.report is not None:
        click.echo(f"report: {r.report}")
    else:
        from .report import INSTALL_HINT, have_matplotlib
        if not have_matplotlib():
            click.echo(f"report: {INSTALL_HINT} for plots of this run (then: llmgen report {r.checkpoint.parent})")
    click.echo(f"more text: llmgen sample --checkpoint {r.checkpoint} --prompt \"ROMEO:\"")


@cli.command(short_help="Continue a prompt with a trained checkpoint.")
@click.option("--checkpoint", "-c", required=True, type=click.Path(dir_okay=False),
              help="model checkpoint (llm.c format) with GPT-2's vocab")
@click.option("--prompt", "-p", default="", help="text the sample continues  [default: none]")
@click.option("-n", "tokens", type=NOT_NEGATIVE, default=200, show_default=True, help="tokens to generate")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="0: always the most likely token")
@click.option("--top-k", type=NOT_NEGATIVE, default=40, show_default=True, help="0: all tokens")
@click.option("--seed", type=int, default=42, show_default=True, help="random seed of the sampler")
@click.option("--build-dir", type=click.Path(file_okay=False),
              help="where to build the sampler  [default: build/sampler-SIZES]")
@click.option("--threads", type=POSITIVE, help="OpenMP threads  [default: all cores]")
@click.option("--batch", type=POSITIVE, default=1, show_default=True,
              help="independent samples drawn together, sharing the prompt's cache")
def sample(checkpoint, prompt, tokens, temperature, top_k, seed, build_dir, threads, batch):
    """Continue a prompt with a trained checkpoint, printing the text as it comes (with --batch,
    the other samples follow the first, each after a line ---), then the speed on stderr."""
    from .run import sample as run_sample
    run_sample(checkpoint, prompt, tokens, temperature=temperature, top_k=top_k, seed=seed,
               build_dir=build_dir, threads=threads, batch=batch)


# ---- data -------------------------------------------------------------------------------
@cli.group(short_help="Make token shards in llm.c's format.")
def data():
    """Make token shards in llm.c's format."""


@data.command(short_help="Tokenize text files or folders into llm.c token shards.")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", type=click.Path(), default="build/data",
              show_default=True, help="output dir for the shards")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
              help=f"share of the tokens for val  [default: {VAL_FRACTION}]")
@click.option("--val-tokens", type=POSITIVE, help="val tokens, instead of a fraction")
@click.option("--shard-tokens", type=POSITIVE, default=SHARD_TOKENS, show_default=True, help="most tokens per shard")
@click.option("--encoding-errors", type=click.Choice(["strict", "replace"]), default="strict", show_default=True,
              help="text that is not UTF-8: an error, or replaced by U+FFFD")
@click.option("--threads", type=POSITIVE, help="tokenizer threads  [default: the cores, at most 8]")
def prepare(inputs, out_dir, val_fraction, val_tokens, shard_tokens, encoding_errors, threads):
    """Tokenize text files or folders into llm.c token shards.

    INPUTS are text files, folders of them, or `shakespeare` for the corpus that ships
    with llmgen. Each file is a document, started by <|endoftext|>. The first tokens go to
    val_000000.bin..., the rest to train_000000.bin...; gpt2_tokenizer.bin (for the
    trainer's -T flag) is written beside them.
    """
    from .prepare import prepare as run_prepare
    r = run_prepare(list(inputs), out_dir, val_fraction=val_fraction, val_tokens=val_tokens,
                    shard_tokens=shard_tokens, errors=encoding_errors, threads=threads)
    click.echo(f"{r.documents:,} document{'s' if r.documents != 1 else ''}, {r.input_bytes / MIB:,.1f} MiB of text: "
               f"{r.tokens:,} tokens ({r.train_tokens:,} train, {r.val_tokens:,} val) in {len(r.shards)} "
               f"shard{'s' if len(r.shards) != 1 else ''} in {out_dir}")
    click.echo(f"tokenized at {r.rate / 1e6:,.2f}M tokens/s ({r.threads} threads)")


@data.command(short_help="Write GPT-2's tokenizer file for the trainer's -T flag.")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), default="gpt2_tokenizer.bin",
              show_default=True, help="the file to write")
def tokenizer(out_path):
    """Write GPT-2's tokenizer in llm.c's format, for the trainer's -T flag."""
    from .tokenizer import write_c_tokenizer
    click.echo(f"wrote {write_c_tokenizer(out_path)}")


@data.command(short_help="Write learnable synthetic train and val shards for a spec's vocab.")
@spec_options
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="build/data-synthetic",
              show_default=True, help="output dir for the shards")
@click.option("--tokens", type=POSITIVE, default=200_000, show_default=True, help="train tokens")
@click.option("--val-tokens", type=POSITIVE, default=20_000, show_default=True, help="val tokens")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed of the chain")
def synthetic(spec, out_dir, tokens, val_tokens, seed):
    """Learnable synthetic text: a random sparse Markov chain over the spec's vocab.

    Writes train_000000.bin and val_000000.bin. A model that learns the chain's
    transitions gets its loss from ln(V) down towards the chain's entropy, which is printed.
    """
    from .fileio import write_shard
    from .synthetic import markov_tokens
    train, val, entropy = markov_tokens(spec.vocab_size, tokens, val_tokens, seed)
    out = Path(out_dir)
    write_shard(out / "train_000000.bin", train)
    write_shard(out / "val_000000.bin", val)
    click.echo(f"wrote {out / 'train_000000.bin'} ({tokens:,} tokens) and {out / 'val_000000.bin'} "
               f"({val_tokens:,} tokens); chain entropy {entropy:.3f} nats/token")


# ---- the emitted program ----------------------------------------------------------------
@cli.command(short_help="Write the trainer (C or CUDA), its harness and a Makefile.")
@spec_options
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="output dir  [default: build/SPEC]")
@click.option("--target", type=click.Choice(Target.values()), default=Target.C.value, show_default=True,
              help="c: train_gpt2.c; cuda: train_gpt2.cu; all: both")
@cuda_options
@click.option("--build/--no-build", default=False, help="also compile it with make")
def emit(spec, out_dir, target, precision, matmul, build):
    """Write train_gpt2.c (or .cu), its test harness and a Makefile for a spec."""
    from .emit import emit as emit_files, make
    target = Target(target)
    out = Path(out_dir or Path("build") / spec.name)
    for path in emit_files(spec, out, target, precision, matmul):
        click.echo(f"wrote {path}")
    if build:
        for program in (["train_gpt2"] if target.c else []) + (["train_gpt2cu"] if target.cuda else []):
            click.echo(f"built {make(out, program)}")


@cli.command(short_help="Parameter count, memory and FLOPs of a spec.")
@spec_options
@click.option("-b", "batch", type=POSITIVE, default=4, show_default=True, help="micro-batch size B")
@click.option("-t", "seq_len", type=POSITIVE, help="sequence length T  [default: min(max_seq_len, 64)]")
@click.option("--target", type=click.Choice([Target.C.value, Target.CUDA.value]), default=Target.C.value,
              show_default=True, help="the memory of the C trainer, or the GPU memory of the CUDA one")
@cuda_options
def info(spec, batch, seq_len, target, precision, matmul):
    """Parameter count, memory of the C trainer (or, with --target cuda, the device memory the
    CUDA trainer allocates: it prints the same total as it starts), and training FLOPs per
    token of a spec."""
    T = seq_len or min(spec.max_seq_len, 64)
    if T > spec.max_seq_len:
        raise LlmgenError(f"-t {T}: must be at most the spec's max_seq_len {spec.max_seq_len}")
    n = num_params(spec)
    flops = specs.flops_per_token(spec, T)
    click.echo(f"{spec.name} ({spec.source})")
    click.echo(f"  {spec.n_layer} layers, {spec.n_head} heads of {spec.head_size}, {spec.n_embd} channels, "
               f"vocab {spec.vocab_size} padded to {spec.padded_vocab_size}, max_seq_len {spec.max_seq_len}")
    click.echo(f"  blocks: {specs.describe_blocks(spec)}")
    click.echo(f"parameters: {num_params(spec, padded=False):,} ({n:,} with the padded vocab)")
    if target == Target.CUDA.value:
        from .emit import cuda_context, device_memory
        ctx = cuda_context(spec, precision, matmul)
        rows = device_memory(spec, batch, T, precision, matmul)
        matmuls = f"cuBLASLt {'TF32' if ctx['tf32'] else precision}" if ctx["cublaslt"] else "tiled"
        extra = ", GELU recomputed" if ctx["recompute_gelu"] else ""
        click.echo(f"device memory of the CUDA trainer ({precision}, {matmuls} matmuls{extra}) at B={batch}, T={T}:")
        for name, nbytes in rows:
            click.echo(f"  {name:<32} {nbytes / MIB:>12,.1f} MiB")
        total = sum(b for _, b in rows)
        click.echo(f"  {'total':<32} {total / MIB:>12,.1f} MiB ({total:,} bytes)")
    else:
        rows = [("parameters", n), ("gradients", n), ("AdamW m and v", 2 * n),
                (f"activations (B={batch}, T={T})", num_acts(spec, batch, T)),
                ("activation gradients", num_acts(spec, batch, T, grads=True))]
        click.echo("memory of the C trainer (fp32):")
        for name, floats in rows:
            click.echo(f"  {name:<32} {floats * 4 / MIB:>12,.1f} MiB")
        click.echo(f"  {'total':<32} {sum(f for _, f in rows) * 4 / MIB:>12,.1f} MiB")
    click.echo(f"training FLOPs per token: {flops['total']:,} at T={T} (matmuls {flops['matmul']:,}: 6 per weight; "
               f"attention {flops['attention']:,}: 6LC(T+1)); {flops['total'] * batch * T / 1e9:,.1f} GFLOP per "
               "step of B*T tokens")


@cli.command(short_help="List the preset specs, smallest first.")
def presets():
    """List the preset specs, smallest first; then the specs the tests use."""
    def row(name):
        s = specs.load(name)
        return (f"{name:<13} layers {s.n_layer:>2}  heads {s.n_head:>2}  channels {s.n_embd:>4}  "
                f"vocab {s.vocab_size:>5}  max_seq_len {s.max_seq_len:>4}  {num_params(s) / 1e6:8.2f}M parameters"
                + ("" if s.is_gpt2 else f"  ({specs.describe_blocks(s)})"))
    for name in specs.preset_names(tests=False):
        click.echo(row(name))
    click.echo("for tests:")
    for name in specs.preset_names(tests=True):
        if name not in specs.preset_names(tests=False):
            click.echo(row(name))


# ---- checking and timing ----------------------------------------------------------------
@cli.command(short_help="Compare the emitted C (or CUDA) with the NumPy reference.")
@spec_options
@click.option("-b", "batch", type=POSITIVE, default=2, show_default=True, help="micro-batch size B")
@click.option("-t", "seq_len", type=POSITIVE, help="sequence length T  [default: min(max_seq_len, 16)]")
@click.option("--steps", type=POSITIVE, default=10, show_default=True, help="AdamW steps to compare")
@click.option("--accum", type=POSITIVE, default=2, show_default=True, help="micro-batches per step")
@click.option("--threads", type=POSITIVE, default=2, show_default=True, help="OpenMP threads")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed of the model and data")
@click.option("--build-dir", type=click.Path(file_okay=False), help="where to build  [default: build/verify-SPEC]")
@click.option("--target", type=click.Choice([Target.C.value, Target.CUDA.value]), default=Target.C.value,
              show_default=True, help="the C trainer, or the CUDA one (needs an NVIDIA GPU)")
@click.option("--trainer", "trainer", metavar="FILE", type=click.Path(dir_okay=False),
              help="verify this train_gpt2.c (or .cu) instead of a fresh one: a copy you edited, for the spec in "
                   "its header (--spec, if given, must agree); the target follows the suffix")
@click.option("--cflags", metavar="FLAGS", help="C compiler flags of the harness  [default: the Makefile's, "
                                                 "-Ofast -march=native]")
@cuda_options
def verify(spec, batch, seq_len, steps, accum, threads, seed, build_dir, target, trainer, cflags, precision, matmul):
    """Build the emitted C (or CUDA) and compare it with the NumPy reference, operation by
    operation in the order the data flows: every activation of a forward, every activation
    and parameter gradient of the backward (layer by layer), then the losses, norms and
    parameters of N AdamW steps. The table ends with the first divergence, if any."""
    from . import edited
    from .verify import format_table, verify as run_verify
    ctx = click.get_current_context()
    if trainer is not None:
        path = Path(trainer)
        file_target = edited.target_of(path).value
        if given_on_command_line(ctx, "target") and target != file_target:
            raise LlmgenError(f"{path}: a {file_target.upper()} trainer (by its suffix), but --target {target}")
        target = file_target
        spec = edited.spec_of(path, spec if given_on_command_line(ctx, *SPEC_PARAMS) else None)
        if target == Target.CUDA.value:
            built = edited.cuda_build_of(path)
            if built is not None:
                for name, value in zip(("precision", "matmul"), built):
                    if given_on_command_line(ctx, name) and ctx.params[name] != value:
                        raise LlmgenError(f"{path}: its header says {name} {value}, but --{name} {ctx.params[name]}")
                precision, matmul = built
        build_dir = build_dir or Path("build") / f"verify-{spec.name}-{path.stem}"
    T = seq_len or min(spec.max_seq_len, 16)
    rows = run_verify(spec, B=batch, T=T, steps=steps, accum=accum, seed=seed, build_dir=build_dir,
                      threads=threads, target=target, precision=precision, matmul=matmul, trainer=trainer,
                      cflags=cflags)
    click.echo(format_table(spec, rows, batch, T, target, precision, trainer))
    if not all(r.ok for r in rows):
        raise SystemExit(1)


@cli.command(short_help="Time the emitted trainer against this machine's FMA peak.")
@spec_options
@click.option("-b", "batch", type=POSITIVE, default=4, show_default=True, help="micro-batch size B")
@click.option("-t", "seq_len", type=POSITIVE, help="sequence length T  [default: min(max_seq_len, 64)]")
@click.option("--threads", type=POSITIVE, help="OpenMP threads  [default: all CPUs]")
@click.option("--steps", type=POSITIVE, default=10, show_default=True, help="timed steps")
@click.option("--warmup", type=NOT_NEGATIVE, default=2, show_default=True, help="untimed steps first")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="where to write the figures  "
              "[default: BUILD_DIR/bench.json]")
@click.option("--build-dir", type=click.Path(file_okay=False), help="where to build  [default: build/bench-SPEC]")
@click.option("--compare-torch", is_flag=True,
              help='also train the same model in PyTorch eager on the same threads, in turn with the trainer, '
                   'and print the ratio (needs torch: pip install "llmgen[bench]")')
@click.option("--rounds", type=POSITIVE, default=1, show_default=True,
              help="runs of the trainer (and of torch, in turn) whose steps are pooled")
@click.option("--sample", "sample_mode", is_flag=True,
              help="time generation instead: 256 new tokens (at most what the window leaves) after a "
                   "16-token prompt at batch 1, against the memory-bandwidth bound (and a PyTorch "
                   "KV-cache loop with --compare-torch)")
def bench(spec, batch, seq_len, threads, steps, warmup, json_path, build_dir, compare_torch, rounds, sample_mode):
    """Time the emitted trainer (production build) against this machine's FMA peak and, with
    --compare-torch, against PyTorch eager; print the figures and whether the targets are met."""
    from .bench import TORCH_HINT, bench as run_bench, format_report, torch_available, write_json
    build_dir = Path(build_dir or Path("build") / f"bench-{spec.name}")
    if sample_mode:
        from .bench import bench_sample, format_sample_report
        result = bench_sample(spec, threads=threads or os.cpu_count(), build_dir=build_dir,
                              compare_torch=compare_torch, rounds=rounds)
        json_path = Path(json_path or build_dir / "bench-sample.json")
        write_json(json_path, result)
        click.echo(format_sample_report(result))
        if not compare_torch:
            click.echo("torch:     " + ("add --compare-torch to time a PyTorch KV-cache loop beside it"
                                        if torch_available() else TORCH_HINT))
        click.echo(f"wrote {json_path}")
        return
    result = run_bench(spec, B=batch, T=seq_len or min(spec.max_seq_len, 64), threads=threads or os.cpu_count(),
                       steps=steps, warmup=warmup, build_dir=build_dir, compare_torch=compare_torch, rounds=rounds)
    json_path = Path(json_path or build_dir / "bench.json")
    write_json(json_path, result)
    click.echo(format_report(result))
    if not compare_torch:
        click.echo("torch:     " + ("add --compare-torch to time PyTorch eager beside it" if torch_available()
                                    else TORCH_HINT))
    click.echo(f"wrote {json_path}")


@cli.command(short_help="Plot training runs from their main.log (needs matplotlib).")
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


# ---- weights in and out -----------------------------------------------------------------
@cli.command("import-hf", short_help="A Hugging Face GPT-2 or Llama to an llm.c checkpoint.")
@click.argument("source", metavar="DIR_OR_FILE", type=click.Path())
@click.option("-o", "--out", "out_path", required=True, type=click.Path(),
              help="the llm.c model checkpoint to write")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="checkpoint version 3 (fp32) or 5 (bf16, rounded to nearest even); 13 or 15 for a Llama")
@click.option("--heads", type=POSITIVE, help="attention heads, when there is no config.json  [default: channels / 64]")
@click.option("--padded-vocab-size", type=POSITIVE,
              help="pad the vocab to this  [default: as an llmgen export recorded it, else a multiple of 128]")
@click.option("--max-seq-len", type=POSITIVE,
              help="cap a Llama's context below its max_position_embeddings  [default: max_position_embeddings]")
def import_hf(source, out_path, dtype, heads, padded_vocab_size, max_seq_len):
    """A Hugging Face model to an llm.c model checkpoint; prints the spec. Reads transformers'
    GPT2LMHeadModel (config.json when present) or LlamaForCausalLM (with its config.json), from
    model.safetensors or the shards model.safetensors.index.json lists."""
    from .fileio import MODEL_VERSIONS, model_version, write_model
    from .hf import import_hf as read_hf
    spec, params, notes = read_hf(source, heads=heads, padded_vocab_size=padded_vocab_size,
                                  name=Path(out_path).stem, max_seq_len=max_seq_len)
    version = model_version(spec, dtype)
    write_model(out_path, spec, params, version)
    for note in notes:
        click.echo(note)
    click.echo(f"wrote {out_path}: llm.c model checkpoint version {version} ({MODEL_VERSIONS[version][0]}), "
               f"{num_params(spec):,} parameters, vocab {spec.vocab_size} padded to {spec.padded_vocab_size}")
    if not spec.is_gpt2:
        click.echo(f"blocks: {specs.describe_blocks(spec)}")
    click.echo(f"spec (a trainer for it: llmgen emit --spec-from {out_path}):")
    click.echo(spec.to_toml(), nl=False)


@cli.command("export-hf", short_help="An llm.c checkpoint to a Hugging Face GPT-2 or Llama.")
@click.argument("checkpoint", metavar="CKPT", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="dir for model.safetensors and config.json")
def export_hf(checkpoint, out_dir):
    """An llm.c model checkpoint to model.safetensors and config.json that transformers loads:
    GPT2LMHeadModel for GPT-2's blocks, LlamaForCausalLM for rmsnorm, rope and swiglu. The
    padded vocab rows are dropped."""
    from .fileio import MODEL_VERSIONS, read_model
    from .hf import check_exportable, export_hf as write_hf
    spec, params, version = read_model(checkpoint, with_version=True)
    check_exportable(spec, checkpoint)  # before anything is written
    model, config, architecture = write_hf(spec, params, out_dir, source=checkpoint)
    kv = f" ({spec.kv_head_count} kv heads)" if spec.kv_head_count != spec.n_head else ""
    click.echo(f"read {checkpoint}: version {version} ({MODEL_VERSIONS[version][0]}), {spec.n_layer} layers, "
               f"{spec.n_head} heads{kv}, {spec.n_embd} channels, vocab {spec.vocab_size}, "
               f"max_seq_len {spec.max_seq_len}")
    if not spec.is_gpt2:
        click.echo(f"blocks: {specs.describe_blocks(spec)}")
    padded = [name for name in ("wte", "lm_head") if name in params]
    rows = spec.padded_vocab_size - spec.vocab_size
    if rows:
        nonzero = [name for name in padded if params[name][spec.vocab_size:].any()]
        state = "all zero" if not nonzero else f"not zero in {' and '.join(nonzero)}: importing back gives zeros there"
        click.echo(f"dropped the {rows} padded vocab rows of {' and '.join(padded)} ({state}; "
                   "the model never uses them)")
    click.echo(f"wrote {model} (float32) and {config} ({architecture})")


def main():
    """Run the command line; every error, a user's or click's (a bad option), is one
    `error: ...` line on stderr and a non-zero exit (2 for a bad option, 1 otherwise)."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        hint = ""
        if isinstance(e, click.UsageError) and e.ctx is not None:
            hint = f" (see {e.ctx.command_path} --help)"
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
