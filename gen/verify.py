"""Compare the emitted C or CUDA trainer with the NumPy reference on the same model and data.

The emitted side is test_gpt2.c or test_gpt2.cu (the trainer included with TESTING defined);
the reference runs in float64 on the same float32 parameters (rounded to bf16 first when the
CUDA trainer runs in bf16, so that both start from the same values). Errors are normwise:
max |c - ref| / max |ref| over a tensor, so a tensor is judged by its largest values.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import reference as ref
from .emit import cuda_build, emit, make
from .errors import LlmgenError
from .fileio import from_bf16, to_bf16, write_model, write_shard
from .spec import Spec
from .tensors import num_params, parameters, unflatten

# Tolerances for float32 C against the float64 reference. Seen on gpt2-124m sizes with
# 2 layers: about 1e-6 forward, 7e-6 for gradients, 3e-7 for losses and norms, and 5e-4
# for parameters after a few AdamW steps (which turn rounding noise in tiny gradients
# into updates of size lr).
TOL_FORWARD = 2e-5     # logits, loss
TOL_GRAD = 1e-4        # parameter gradients after one backward
TOL_CURVE = 1e-5       # the losses and gradient norms of the AdamW steps
TOL_PARAMS = 2e-3      # the parameters after the AdamW steps

# bf16 (CUDA): every activation is rounded to 8 significant bits (a relative error of up to
# 2^-9, about 2e-3) after each kernel, and the gradients of activations too, so errors are a
# few times that after a forward and about ten times that for gradients after the backward
# through them; the parameters after AdamW steps differ by up to about lr per step where a
# small gradient changes sign. First estimates, to be confirmed on a GPU.
TOLERANCES = {
    "fp32": {"forward": TOL_FORWARD, "grad": TOL_GRAD, "curve": TOL_CURVE, "params": TOL_PARAMS},
    "bf16": {"forward": 3e-2, "grad": 5e-2, "curve": 3e-2, "params": 1e-1},
}


@dataclass
class Row:
    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tol


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


def build(spec: Spec, out_dir: Path, cc: str = "gcc") -> Path:
    emit(spec, out_dir)
    return make(out_dir, "test_gpt2", cc)


def build_cuda(spec: Spec, out_dir: Path, precision: str, matmul: str) -> Path:
    """The CUDA harness, its fp32 matmuls exact (no TF32): verify compares with float64 at
    fp32's tolerances."""
    with cuda_build(tf32=False):
        emit(spec, out_dir, "cuda", precision, matmul)
    return make(out_dir, "test_gpt2cu")


def run_harness(exe: Path, work: Path, spec: Spec, params, tokens, B: int, T: int, steps: int, accum: int,
                hp: dict, threads: int, version: int = 3) -> dict[str, np.ndarray]:
    """Run a harness (C or CUDA) on params written as a model checkpoint of the given version."""
    model_path, tokens_path, out_path = work / "model.bin", work / "tokens.bin", work / "out.bin"
    write_model(model_path, spec, params, version)
    write_shard(tokens_path, tokens)
    args = [str(exe), str(model_path), str(tokens_path), str(B), str(T), str(steps), str(accum),
            repr(hp["lr"]), str(hp["warmup"]), repr(hp["final_frac"]), repr(hp["weight_decay"]),
            repr(hp["grad_clip"]), str(out_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise LlmgenError(f"{exe} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    out = np.fromfile(out_path, dtype="<f4")
    n = num_params(spec)
    parts, off = {}, 0

    def take(name, count, shape=None):
        nonlocal off
        a = out[off:off + count]
        off += count
        parts[name] = a.reshape(shape) if shape else a

    take("logits", B * T * spec.padded_vocab_size, (B, T, spec.padded_vocab_size))
    take("loss", 1)
    take("grads", n)
    take("train", 2 * steps, (steps, 2))
    take("params", n)
    if off != out.size:
        raise LlmgenError(f"{out_path}: harness wrote {out.size} floats, expected {off}")
    return parts


def verify(spec: Spec, B: int = 2, T: int | None = None, steps: int = 10, accum: int = 2,
           seed: int = 0, build_dir: str | Path | None = None, threads: int = 2, cc: str = "gcc",
           target: str = "c", precision: str = "fp32", matmul: str = "cublaslt") -> list[Row]:
    """Build the harness for target "c" or "cuda" and compare what it computes with the reference."""
    T = T or min(spec.max_seq_len, 16)
    if T > spec.max_seq_len:
        raise LlmgenError(f"-t {T} is larger than the spec's max_seq_len {spec.max_seq_len}")
    if target == "cuda":
        problem = cuda_device_problem()
        if problem is not None:
            raise LlmgenError(f"no CUDA device: {problem}")
        build_dir = Path(build_dir or Path("build") / f"verify-{spec.name}-cuda-{precision}-{matmul}")
        exe = build_cuda(spec, build_dir, precision, matmul)
        tol = TOLERANCES[precision]
    elif target == "c":
        build_dir = Path(build_dir or Path("build") / f"verify-{spec.name}")
        exe = build(spec, build_dir, cc)
        tol = TOLERANCES["fp32"]
    else:
        raise LlmgenError(f"target '{target}': expected c or cuda")
    params = verify_params(spec, seed)
    if target == "cuda" and precision == "bf16":
        params = {name: round_to_bf16(p) for name, p in params.items()}
    rng = np.random.default_rng(seed + 2)
    n_tokens = steps * accum * B * T + 1
    tokens = rng.integers(0, spec.vocab_size, n_tokens)
    # the reference, in float64, on the same parameters and batches
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    batches = [(tokens[i * B * T:(i + 1) * B * T].reshape(B, T), tokens[i * B * T + 1:(i + 1) * B * T + 1].reshape(B, T))
               for i in range(steps * accum)]
    logits, loss, cache = ref.forward(spec, p64, *batches[0])
    grads = ref.backward(spec, p64, cache)

    # a warmup, a cosine decay, weight decay, and a clip that acts on the first steps
    hp = {"lr": 1e-3, "warmup": 2, "final_frac": 0.1, "weight_decay": 0.1,
          "grad_clip": float(np.float32(0.5 * ref.grad_norm(grads)))}
    c = run_harness(exe, build_dir, spec, params, tokens, B, T, steps, accum, hp, threads)
    rows = [Row("logits", rel_error(c["logits"], logits), tol["forward"]),
            Row("loss", rel_error(c["loss"], [loss]), tol["forward"])]
    cgrads = unflatten(c["grads"], spec)
    rows += [Row(f"grad {t.name}", rel_error(cgrads[t.name], grads[t.name]), tol["grad"]) for t in parameters(spec)]

    m = {k: np.zeros_like(v) for k, v in p64.items()}
    v = {k: np.zeros_like(v) for k, v in p64.items()}
    losses, norms = [], []
    for step in range(steps):
        lr = ref.lr_at(step, steps, hp["lr"], hp["warmup"], hp["final_frac"])
        loss_s, norm_s = ref.train_step(spec, p64, m, v, step + 1, batches[step * accum:(step + 1) * accum],
                                        lr, hp["weight_decay"], hp["grad_clip"])
        losses.append(loss_s)
        norms.append(norm_s)
    rows.append(Row(f"losses ({steps} steps)", rel_error(c["train"][:, 0], losses), tol["curve"]))
    rows.append(Row(f"grad norms ({steps} steps)", rel_error(c["train"][:, 1], norms), tol["curve"]))
    cparams = unflatten(c["params"], spec)
    C = spec.n_embd
    for t in parameters(spec):
        cp, rp = cparams[t.name], p64[t.name]
        name = f"param {t.name} after {steps} steps"
        if t.name == "qkvb":
            # The key bias's gradient is exactly zero (softmax ignores a shift shared by a
            # row of scores), so AdamW turns float rounding noise into updates there.
            KV = spec.kv_head_count * spec.head_size
            cp, rp = np.delete(cp, np.s_[C:C + KV], axis=-1), np.delete(rp, np.s_[C:C + KV], axis=-1)
            name += " (key bias excluded)"
        rows.append(Row(name, rel_error(cp, rp), tol["params"]))
    return rows


def format_table(spec: Spec, rows: list[Row], B: int, T: int, target: str = "c", precision: str = "fp32") -> str:
    width = max(len(r.name) for r in rows)
    what = "C (float32)" if target == "c" else f"CUDA ({precision})"
    lines = [f"verify {spec.name} (B={B}, T={T}): emitted {what} against the NumPy reference (float64)",
             f"{'tensor'.ljust(width)}  max rel err  tolerance  result", "-" * (width + 33)]
    for r in rows:
        lines.append(f"{r.name.ljust(width)}  {r.error:11.3e}  {r.tol:9.0e}  {'ok' if r.ok else 'FAIL'}")
    bad = [r for r in rows if not r.ok]
    lines.append(f"{len(bad)} of {len(rows)} outside tolerance" if bad else f"all {len(rows)} within tolerance")
    return "\n".join(lines)
