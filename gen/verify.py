"""Compare the emitted C or CUDA trainer with the NumPy reference on the same model and data.

The emitted side is test_gpt2.c or test_gpt2.cu (the trainer included with TESTING defined,
or a copy the user edited: see edited.py); the reference runs in float64 on the same float32
parameters (rounded to bf16 first when the CUDA trainer runs in bf16, so that both start from
the same values). The harness writes what the trainer keeps: the activations of a forward,
their gradients after a backward (C), the parameter gradients, the losses and norms of AdamW
steps and the parameters after them. The rows follow the data (compare): each forward op with
the activations it writes, layer by layer, then the backward ops in reverse with the
activation and parameter gradients they compute, then the optimizer; the first row outside
tolerance is the first divergence. Errors are normwise: max |c - ref| / max |ref| over a
tensor (or one layer's slice of it), so a tensor is judged by its largest values.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import edited
from . import reference as ref
from .emit import cuda_build, emit, make
from .enums import Position, Target
from .errors import LlmgenError
from .fileio import from_bf16, to_bf16, write_model, write_shard
from .spec import Spec
from .tensors import activation_name, activations, num_params, numel, parameters, sizes, unflatten

# Tolerances for float32 C against the float64 reference. Seen on gpt2-124m sizes with
# 2 layers: about 1e-6 forward, 7e-6 for gradients, 3e-7 for losses and norms, and 5e-4
# for parameters after a few AdamW steps (which turn rounding noise in tiny gradients
# into updates of size lr).
TOL_FORWARD = 2e-5     # logits, loss
TOL_GRAD = 1e-4        # parameter gradients after one backward
TOL_CURVE = 1e-5       # the losses and gradient norms of the AdamW steps
TOL_PARAMS = 2e-3      # the parameters after the AdamW steps

# bf16 (CUDA): every activation is rounded to 8 significant bits (a relative error of up to
# 2^-8, about 3.9e-3) after each kernel, and the gradients of activations too, so errors are a
# few times that after a forward and about ten times that for gradients after the backward
# through them; the parameters after AdamW steps differ by up to about lr per step where a
# small gradient changes sign. Seen through the CPU emulator (tests/test_cuda_emulated_verify.py,
# test-odd): 3e-3 to 7e-3 forward, up to 1.4e-2 for gradients; to be confirmed on a GPU.
TOLERANCES = {
    "fp32": {"forward": TOL_FORWARD, "grad": TOL_GRAD, "curve": TOL_CURVE, "params": TOL_PARAMS},
    "bf16": {"forward": 3e-2, "grad": 5e-2, "curve": 3e-2, "params": 1e-1},
}


@dataclass
class Row:
    """One comparison: a tensor (or a slice of one layer) after an operation."""
    name: str                 # the tensor: ln1, dln1 (an activation's gradient), dln1w (a parameter's)
    error: float
    tol: float
    phase: str = ""           # forward, backward or optimizer
    layer: int | None = None  # the block, or None outside the blocks
    op: str = ""              # the operation that computed it, e.g. "layernorm 2"

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tol

    @property
    def where(self) -> str:
        """e.g. 'backward, layer 0, layernorm 2'."""
        return ", ".join([self.phase] + ([f"layer {self.layer}"] if self.layer is not None else []) + [self.op])


def rel_error(c: np.ndarray, r: np.ndarray) -> float:
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    scale = np.max(np.abs(r)) if r.size else 0.0
    return float(np.max(np.abs(c - r)) / max(scale, 1e-30)) if r.size else 0.0


def verify_params(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    """A random model with every tensor perturbed, so that no layernorm is the identity."""
    params = ref.init_params(spec, seed=seed, dtype=np.float32)
    rng = np.random.default_rng(seed + 1)
    for t in parameters(spec):
        params[t.name] = (params[t.name] + rng.normal(0, 0.05, params[t.name].shape)).astype(np.float32)
    return params


def round_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32."""
    return from_bf16(to_bf16(a)).reshape(np.shape(a))


def cuda_device_problem() -> str | None:
    """Why no CUDA device can be used here, or None if one can: asks the driver (libcuda) itself."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"cannot load libcuda.so.1, the NVIDIA driver ({e})"

    def error(call: str, rc: int) -> str:
        text = ctypes.c_char_p()
        cuda.cuGetErrorString(rc, ctypes.byref(text))
        return f"{call} failed: {text.value.decode() if text.value else 'CUDA driver error'} ({rc})"

    rc = cuda.cuInit(0)
    if rc != 0:
        return error("cuInit", rc)
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return error("cuDeviceGetCount", rc)
    return None if count.value > 0 else "the driver sees no GPU"


def build(spec: Spec, out_dir: Path, cc: str = "gcc", trainer: Path | None = None,
          cflags: str | None = None) -> Path:
    """The C harness (test_gpt2), around the emitted train_gpt2.c or around `trainer`, a copy
    of it that a user edited."""
    emit(spec, out_dir)
    if trainer is None:
        return make(out_dir, "test_gpt2", cc, {"CFLAGS": cflags} if cflags else None)
    edited.install(trainer, out_dir / "train_gpt2.c")
    return edited.make(out_dir, "test_gpt2", trainer, cc, {"CFLAGS": cflags} if cflags else None)


def build_cuda(spec: Spec, out_dir: Path, precision: str, matmul: str, trainer: Path | None = None) -> Path:
    """The CUDA harness, its fp32 matmuls exact (no TF32): verify compares with float64 at
    fp32's tolerances."""
    with cuda_build(tf32=False):
        emit(spec, out_dir, "cuda", precision, matmul)
    if trainer is None:
        return make(out_dir, "test_gpt2cu")
    edited.install(trainer, out_dir / "train_gpt2.cu")
    return edited.make(out_dir, "test_gpt2cu", trainer)


# ---- running the harness ---------------------------------------------------------------
def run_harness(exe: Path, work: Path, spec: Spec, params, tokens, B: int, T: int, steps: int, accum: int,
                hp: dict, threads: int, version: int = 3, target: Target = Target.C) -> dict:
    """Run a harness (C or CUDA) on params written as a model checkpoint of the given version.
    Returns what it wrote: logits, loss, acts and dacts (dicts of named activations and their
    gradients, as tensors.activations lists them), grads, train and params."""
    model_path, tokens_path, out_path = work / "model.bin", work / "tokens.bin", work / "out.bin"
    write_model(model_path, spec, params, version)
    write_shard(tokens_path, tokens)
    args = [str(exe), str(model_path), str(tokens_path), str(B), str(T), str(steps), str(accum),
            repr(hp["lr"]), str(hp["warmup"]), repr(hp["final_frac"]), repr(hp["weight_decay"]),
            repr(hp["grad_clip"]), str(out_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        how = (f"killed by {signal.Signals(-result.returncode).name}" if result.returncode < 0
               else f"exit {result.returncode}")
        raise LlmgenError(f"{exe} failed ({how}):\n{result.stdout}{result.stderr}".rstrip())
    out = np.fromfile(out_path, dtype="<f4")
    n = num_params(spec)
    acts = activations(spec, target)
    dims = {**spec.dims, "B": B, "T": T, "CR": min(B * T, spec.classifier_rows)}
    parts, off = {}, 0

    def take(count, shape=None):
        nonlocal off
        a = out[off:off + count]
        off += count
        if a.size != count:
            raise LlmgenError(f"{out_path}: the harness wrote {out.size} floats, fewer than its layout needs "
                              f"(the trainer's activations or parameters are no longer those of the spec)")
        return a.reshape(shape) if shape else a

    def named(with_grad: bool) -> dict[str, np.ndarray]:
        return {a.name: take(numel(a.shape, dims), sizes(a.shape, dims)) for a in acts if a.grad or not with_grad}

    parts["logits"] = take(B * T * spec.padded_vocab_size, (B, T, spec.padded_vocab_size))
    parts["loss"] = take(1)
    parts["acts"] = named(False)
    parts["grads"] = take(n)
    parts["dacts"] = named(True) if target is Target.C else {}
    parts["train"] = take(2 * steps, (steps, 2))
    parts["params"] = take(n)
    if off != out.size:
        raise LlmgenError(f"{out_path}: the harness wrote {out.size} floats, expected {off} (the trainer's "
                          "activations or parameters are no longer those of the spec)")
    return parts


# ---- the comparison, in the order the data flows --------------------------------------
def forward_ops(spec: Spec) -> tuple[list, list, list]:
    """The operations of the forward, each (name, activations it writes): before the blocks,
    those of each block, after them."""
    norm, act = spec.norm.value, activation_name(spec)
    rope = spec.position is Position.ROPE
    before = [("encoder", ["encoded"])]
    block = [(f"{norm} 1", ["ln1", "ln1_mean", "ln1_rstd"]),
             ("qkv + rope" if rope else "qkv", ["qkv"]),
             ("attention", ["atty", "att_lse"]),
             ("attproj + residual", ["residual2"]),
             (f"{norm} 2", ["ln2", "ln2_mean", "ln2_rstd"]),
             ("fc", ["fch"]),
             (spec.mlp.value, [act]),
             ("fcproj + residual", ["residual3"])]
    after = [(f"final {norm}", ["lnf", "lnf_mean", "lnf_rstd"])]
    return before, block, after


def backward_ops(spec: Spec) -> list:
    """The operations of one block's backward, in order, each (name, activation gradients
    it writes, parameters whose gradient it adds to); "input" is the block's input. The
    gradient of residual2 (and of the block's input) is the residual's copy plus the norm's
    backward, which adds into it: both are named."""
    norm, act = spec.norm.value, activation_name(spec)
    rope = spec.position is Position.ROPE
    return [("fcproj", [act], ["fcprojw", "fcprojb"]),
            (spec.mlp.value, ["fch"], []),
            ("fc", ["ln2"], ["fcw", "fcb"]),
            (f"{norm} 2 + residual", ["residual2"], ["ln2w", "ln2b"]),
            ("attproj", ["atty"], ["attprojw", "attprojb"]),
            ("attention + rope" if rope else "attention", ["qkv"], []),
            ("qkv", ["ln1"], ["qkvw", "qkvb"]),
            (f"{norm} 1 + residual", ["input"], ["ln1w", "ln1b"])]


def compare(spec: Spec, c: dict, ref_logits, ref_loss, cache: dict, ref_grads: dict, ref_dacts: dict,
            tol: dict, target: Target) -> list[Row]:
    """Rows for one forward and backward, in data-flow order: every activation the trainer
    keeps after the op that writes it, then in the backward every activation gradient and
    parameter gradient (per layer) after the op that computes it."""
    L = spec.n_layer
    kept = {a.name for a in activations(spec, target)}
    cgrads = unflatten(c["grads"], spec)
    rows: list[Row] = []

    def fwd(op, names, layer=None):
        for name in names:
            if name in kept and name in cache:
                cv, rv = c["acts"][name], cache[name]
                if layer is not None:
                    cv, rv = cv[layer], rv[layer]
                rows.append(Row(name, rel_error(cv, rv), tol["forward"], "forward", layer, op))

    def bwd(op, dacts, params, layer=None):
        for name in dacts:
            if name == "input":  # the block's input: the residual3 before it, or the encoder's output
                name, at = ("residual3", layer - 1) if layer > 0 else ("encoded", None)
            elif name == "output":  # the last block's output, into the final norm
                name, at = "residual3", L - 1
            else:
                at = layer
            if name in c["dacts"]:
                cv, rv = c["dacts"][name], ref_dacts[name]
                if at is not None:
                    cv, rv = cv[at], rv[at]
                label = f"d{name}" + (f" of layer {at}" if at is not None and at != layer else "")
                rows.append(Row(label, rel_error(cv, rv), tol["grad"], "backward", layer, op))
        for name in params:
            if name in cgrads:
                cv, rv = cgrads[name], ref_grads[name]
                if layer is not None:
                    cv, rv = cv[layer], rv[layer]
                rows.append(Row(f"d{name}", rel_error(cv, rv), tol["grad"], "backward", layer, op))

    before, block, after = forward_ops(spec)
    for op, names in before:
        fwd(op, names)
    for l in range(L):
        for op, names in block:
            fwd(op, names, l)
    for op, names in after:
        fwd(op, names)
    rows.append(Row("logits", rel_error(c["logits"], ref_logits), tol["forward"], "forward", None, "classifier"))
    rows.append(Row("losses", rel_error(c["acts"]["losses"], cache["losses"]), tol["forward"], "forward", None, "loss"))
    rows.append(Row("loss", rel_error(c["loss"], [ref_loss]), tol["forward"], "forward", None, "loss"))

    bwd("classifier", ["lnf"], [] if spec.tie_embeddings else ["lm_head"])
    bwd(f"final {spec.norm.value}", ["output"], ["lnfw", "lnfb"])
    for l in reversed(range(L)):
        for op, dacts, params in backward_ops(spec):
            bwd(op, dacts, params, l)
    bwd("encoder", [], ["wte", "wpe"])  # (a tied wte's gradient: the classifier's and the encoder's)
    return rows


def verify(spec: Spec, B: int = 2, T: int | None = None, steps: int = 10, accum: int = 2,
           seed: int = 0, build_dir: str | Path | None = None, threads: int = 2, cc: str = "gcc",
           target: str = "c", precision: str = "fp32", matmul: str = "cublaslt",
           trainer: str | Path | None = None, cflags: str | None = None) -> list[Row]:
    """Build the harness for target "c" or "cuda" (around `trainer`, an edited copy of the
    emitted trainer, if given) and compare what it computes with the reference: rows in the
    order the data flows (see compare), then the optimizer's steps."""
    T = T or min(spec.max_seq_len, 16)
    target = Target.parse(target, "target")
    trainer = Path(trainer) if trainer is not None else None
    if T > spec.max_seq_len:
        raise LlmgenError(f"-t {T} is larger than the spec's max_seq_len {spec.max_seq_len}")
    if target is Target.CUDA:
        problem = cuda_device_problem()
        if problem is not None:
            raise LlmgenError(f"no CUDA device: {problem}" + (" (comparing a CUDA trainer needs a GPU)" if trainer else ""))
        build_dir = Path(build_dir or Path("build") / f"verify-{spec.name}-cuda-{precision}-{matmul}")
        exe = build_cuda(spec, build_dir, precision, matmul, trainer)
    else:
        build_dir = Path(build_dir or Path("build") / f"verify-{spec.name}")
        exe = build(spec, build_dir, cc, trainer, cflags)
    return check(spec, exe, build_dir, target, precision, B, T, steps, accum, seed, threads)


def check(spec: Spec, exe: Path, work: Path, target: Target, precision: str, B: int, T: int, steps: int,
          accum: int, seed: int, threads: int) -> list[Row]:
    """Run a built harness (in work) and compare it with the reference: the rows of one
    forward and backward in data-flow order (see compare), then those of the AdamW steps."""
    tol = TOLERANCES[precision if target is Target.CUDA else "fp32"]
    params = verify_params(spec, seed)
    if target is Target.CUDA and precision == "bf16":
        params = {name: round_to_bf16(p) for name, p in params.items()}
    rng = np.random.default_rng(seed + 2)
    n_tokens = steps * accum * B * T + 1
    tokens = rng.integers(0, spec.vocab_size, n_tokens)
    # the reference, in float64, on the same parameters and batches
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    batches = [(tokens[i * B * T:(i + 1) * B * T].reshape(B, T), tokens[i * B * T + 1:(i + 1) * B * T + 1].reshape(B, T))
               for i in range(steps * accum)]
    logits, loss, cache = ref.forward(spec, p64, *batches[0])
    dacts: dict[str, np.ndarray] = {}
    grads = ref.backward(spec, p64, cache, record=dacts)

    # a warmup, a cosine decay, weight decay, and a clip that acts on the first steps
    hp = {"lr": 1e-3, "warmup": 2, "final_frac": 0.1, "weight_decay": 0.1,
          "grad_clip": float(np.float32(0.5 * ref.grad_norm(grads)))}
    c = run_harness(exe, work, spec, params, tokens, B, T, steps, accum, hp, threads, target=target)
    rows = compare(spec, c, logits, loss, cache, grads, dacts, tol, target)

    m = {k: np.zeros_like(v) for k, v in p64.items()}
    v = {k: np.zeros_like(v) for k, v in p64.items()}
    losses, norms = [], []
    for step in range(steps):
        lr = ref.lr_at(step, steps, hp["lr"], hp["warmup"], hp["final_frac"])
        loss_s, norm_s = ref.train_step(spec, p64, m, v, step + 1, batches[step * accum:(step + 1) * accum],
                                        lr, hp["weight_decay"], hp["grad_clip"])
        losses.append(loss_s)
        norms.append(norm_s)
    op = f"{steps} AdamW steps"
    rows.append(Row("losses", rel_error(c["train"][:, 0], losses), tol["curve"], "optimizer", None, op))
    rows.append(Row("grad norms", rel_error(c["train"][:, 1], norms), tol["curve"], "optimizer", None, op))
    cparams = unflatten(c["params"], spec)
    C = spec.n_embd
    for t in parameters(spec):
        cp, rp = cparams[t.name], p64[t.name]
        name = t.name
        if t.name == "qkvb":
            # The key bias's gradient is exactly zero (softmax ignores a shift shared by a
            # row of scores), so AdamW turns float rounding noise into updates there.
            KV = spec.kv_head_count * spec.head_size
            cp, rp = np.delete(cp, np.s_[C:C + KV], axis=-1), np.delete(rp, np.s_[C:C + KV], axis=-1)
            name += " (key bias excluded)"
        rows.append(Row(name, rel_error(cp, rp), tol["params"], "optimizer", None, op))
    return rows


def first_divergence(rows: list[Row]) -> str | None:
    """The first row outside tolerance, in the order the data flows, as one line; None if
    every row is within."""
    i = next((i for i, r in enumerate(rows) if not r.ok), None)
    if i is None:
        return None
    r = rows[i]
    before = "everything before it matches" if i > 0 else "it is the first comparison"
    return f"first divergence: {r.where} ({r.name} max rel err {r.error:.1e}, tolerance {r.tol:.0e}); {before}"


def format_table(spec: Spec, rows: list[Row], B: int, T: int, target: str = "c", precision: str = "fp32",
                 trainer: str | Path | None = None) -> str:
    what = "C (float32)" if Target.parse(target, "target") is Target.C else f"CUDA ({precision})"
    program = f"{trainer}, {what}," if trainer else f"emitted {what}"
    op_width = max(len(r.op) for r in rows)
    width = max(len(r.name) for r in rows)
    lines = [f"verify {spec.name} (B={B}, T={T}): {program} against the NumPy reference (float64)",
             f"{'phase':<9}  {'layer':>5}  {'operation'.ljust(op_width)}  {'tensor'.ljust(width)}  "
             f"max rel err  tolerance  result",
             "-" * (9 + 7 + op_width + width + 37)]
    for r in rows:
        layer = "-" if r.layer is None else str(r.layer)
        lines.append(f"{r.phase:<9}  {layer:>5}  {r.op.ljust(op_width)}  {r.name.ljust(width)}  {r.error:11.3e}  "
                     f"{r.tol:9.0e}  {'ok' if r.ok else 'FAIL'}")
    bad = [r for r in rows if not r.ok]
    if not bad:
        lines.append(f"all {len(rows)} within tolerance")
    else:
        lines.append(f"{len(bad)} of {len(rows)} outside tolerance")
        lines.append(first_divergence(rows))
    return "\n".join(lines)
