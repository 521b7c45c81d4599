"""The blocks a spec can choose besides GPT-2's (RMSNorm, rotary positions, SwiGLU and ReLU^2,
grouped-query attention, no biases, an untied classifier): the spec's rules, the reference's
layers and whole models against float64 finite differences, and the emitted C trainer against
the reference (llmgen verify) for a grid of combinations on small odd specs."""


import numpy as np
import pytest

from llmgen import reference as ref
from llmgen import spec as specs
from llmgen.fileio import read_model_spec, write_model
from llmgen.tensors import num_params, parameters

from conftest import llmgen, tiny_data  # noqa: F401 (a fixture)
from test_reference import check_gradients, fd_check, random_batch

# 3 layers... kept at 2 for speed in the reference; 6 heads of 8 channels, a vocab of 97, an MLP
# width that is no multiple of any tile
BASE = {"name": "odd-variant", "layers": 2, "heads": 6, "channels": 48, "vocab_size": 97, "max_seq_len": 16,
        "mlp_hidden": 37}
LLAMA = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "kv_heads": 2, "bias": False,
         "tie_embeddings": False, "norm_eps": 1e-6, "rope_theta": 500.0}


def variant(**keys):
    return specs.from_dict({**BASE, **keys}, "test")


# ---- the spec -----------------------------------------------------------------------------
def test_gpt2_specs_are_unchanged_and_variants_round_trip(tmp_path):
    gpt2 = specs.load("gpt2-124m")
    assert gpt2.is_gpt2 and gpt2.arch() == {} and "norm" not in gpt2.to_toml()
    v = variant(**LLAMA)
    assert not v.is_gpt2 and v.arch()["kv_heads"] == 2
    path = tmp_path / "v.toml"
    path.write_text(v.to_toml())
    assert specs.load(str(path)) == v
    # the defaults, spelled or not, make the same spec
    assert variant(kv_heads=6) == variant()
    assert specs.from_dict({**BASE, "mlp_hidden": 4 * 48}, "t") == specs.from_dict(
        {k: v for k, v in BASE.items() if k != "mlp_hidden"}, "t")
    write_model(tmp_path / "v.bin", v, ref.init_params(v, seed=0), 3)
    back, version = read_model_spec(tmp_path / "v.bin")
    assert back == v and version == 13


def toml(raw: dict) -> str:
    def value(v):
        return ("true" if v else "false") if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else repr(v)
    return "".join(f"{k} = {value(v)}\n" for k, v in raw.items())


@pytest.mark.parametrize("keys, field, problem", [
    ({"rope_theta": 100.0}, "rope_theta", "position is not \"rope\""),
    ({"kv_heads": 4}, "kv_heads", "does not divide heads 6"),
    ({"position": "rope", "heads": 16}, "position", "even head size"),
    ({"norm": "batchnorm"}, "norm", "must be one of 'layernorm', 'rmsnorm'"),
    ({"mlp": "geglu"}, "mlp", "must be one of"),
    ({"norm_eps": 0}, "norm_eps", "positive finite"),
    ({"norm_eps": "1e-5"}, "norm_eps", "must be a number"),
    ({"bias": 1}, "bias", "true or false"),
    ({"mlp_hidden": 0}, "mlp_hidden", "must be positive"),
])
def test_bad_combinations_are_refused_naming_the_file_and_key(tmp_path, keys, field, problem):
    path = tmp_path / "bad.toml"
    path.write_text(toml({**BASE, **keys}))
    result = llmgen("info", "--spec", path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{path}: field '{field}'" in result.stderr and problem in result.stderr, result.stderr


def test_cli_overrides_on_every_spec_command():
    result = llmgen("info", "--spec", "gpt2-tiny", "--norm", "rmsnorm", "--position", "rope", "--mlp", "swiglu",
                    "--kv-heads", "2", "--no-bias", "--untied")
    assert result.returncode == 0, result.stderr
    assert "blocks: rmsnorm, rope (theta 10000), swiglu, 2 kv heads, no biases, untied classifier" in result.stdout


def test_parameter_count_follows_the_blocks():
    v = variant(**LLAMA)
    C, L, H, KV, Vp = 48, 2, 37, 2 * 8, 128
    per_layer = C + (C + 2 * KV) * C + C * C + C + 2 * H * C + C * H
    assert num_params(v) == Vp * C + L * per_layer + C + Vp * C
    assert [p.name for p in parameters(v)] == ["wte", "ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fcprojw", "lnfw",
                                               "lm_head"]


# ---- the reference ------------------------------------------------------------------------
def test_new_layers_against_finite_differences():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 5, 12)), 1 + 0.3 * rng.standard_normal(12)
    dout = rng.standard_normal((2, 5, 12))
    rstd = ref.rmsnorm_forward(x, w, 1e-5)[1]
    dx, dw = ref.rmsnorm_backward(dout, x, w, rstd)
    fd_check(lambda: ref.rmsnorm_forward(x, w, 1e-5)[0], x, dout, dx, rng, 12)
    fd_check(lambda: ref.rmsnorm_forward(x, w, 1e-5)[0], w, dout, dw, rng, 12)

    NH, KVH, HS, T = 6, 2, 8, 7
    qkv = rng.standard_normal((2, T, (NH + 2 * KVH) * HS))
    dout = rng.standard_normal(qkv.shape)
    fd_check(lambda: ref.rope_forward(qkv, NH, KVH, 50.0), qkv, dout, ref.rope_backward(dout, NH, KVH, 50.0), rng, 12)
    dy = rng.standard_normal((2, T, NH * HS))
    att = ref.attention_forward(qkv, NH, KVH)[2]
    fd_check(lambda: ref.attention_forward(qkv, NH, KVH)[0], qkv, dy, ref.attention_backward(dy, qkv, att, NH, KVH),
             rng, 12)

    fch = 2 * rng.standard_normal((3, 2 * 11))
    dh = rng.standard_normal((3, 11))
    fd_check(lambda: ref.swiglu_forward(fch), fch, dh, ref.swiglu_backward(dh, fch), rng, 12)
    g = 2 * rng.standard_normal((3, 40)) + 0.01  # away from the kink at 0
    dout = rng.standard_normal((3, 40))
    fd_check(lambda: ref.relu2_forward(g), g, dout, ref.relu2_backward(dout, g), rng, 12)


def test_rope_is_transformers_rotate_half():
    """q' = q cos + rotate_half(q) sin with rotate_half(x) = (-x2, x1), the angles t / theta^(2i/HS)."""
    HS, T, theta = 8, 5, 100.0
    q = np.random.default_rng(1).standard_normal((1, T, 1 * HS))
    qkv = np.concatenate([q, q, q], axis=-1)  # one head of q, k and v
    rotated = ref.rope_forward(qkv, 1, 1, theta)[..., :HS]
    inv = 1.0 / theta ** (np.arange(0, HS, 2) / HS)
    ang = np.arange(T)[:, None] * np.concatenate([inv, inv])[None, :]
    half = np.concatenate([-q[..., HS // 2:], q[..., :HS // 2]], axis=-1)
    np.testing.assert_allclose(rotated, q * np.cos(ang) + half * np.sin(ang), rtol=1e-12)


GRID = [dict(LLAMA), dict(LLAMA, kv_heads=1), dict(LLAMA, mlp="relu2", tie_embeddings=True),
        {"norm": "rmsnorm", "bias": False}, {"position": "rope", "mlp": "swiglu"}, {"kv_heads": 3, "bias": False},
        {"mlp": "relu2", "tie_embeddings": False, "norm_eps": 1e-3}]


@pytest.mark.parametrize("keys", GRID, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_whole_models_against_finite_differences(keys):
    spec = variant(**keys)
    tokens, targets = random_batch(spec, B=2, T=7, seed=3)
    check_gradients(spec, tokens, targets, seed=4, per_tensor=4)


# ---- the emitted C trainer against the reference ---------------------------------------------
# 3 layers, 6 heads of 8 channels with 2 and with 1 key/value heads, an MLP width that is no
# multiple of any tile, T = 13, a vocab of 97 (padded to 128)
C_BASE = dict(BASE, layers=3, max_seq_len=24)
C_GRID = [dict(LLAMA), dict(LLAMA, kv_heads=1, bias=True), dict(LLAMA, mlp="relu2", tie_embeddings=True),
          {"norm": "rmsnorm"}, {"position": "rope", "rope_theta": 50.0}, {"mlp": "swiglu", "bias": False},
          {"kv_heads": 3}, {"mlp": "relu2", "tie_embeddings": False, "norm_eps": 1e-3}, {"bias": False}]


@pytest.mark.parametrize("keys", C_GRID, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_verify_passes_for_every_variant(tmp_path, keys):
    from llmgen.verify import verify
    spec = specs.from_dict({**C_BASE, **keys}, "test")
    rows = verify(spec, B=2, T=13, steps=3, build_dir=tmp_path)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    from test_verify import assert_covers_everything
    assert_covers_everything(spec, rows)


def test_cuda_refuses_the_blocks_it_does_not_compute(tmp_path):
    result = llmgen("emit", "--spec", "llama-tiny", "--target", "cuda", "-o", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the CUDA trainer computes GPT-2's blocks only" in result.stderr and "norm = rmsnorm" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_variant_trains_checkpoints_resumes_and_samples(tmp_path, tiny_data):
    """Every feature of the trainer works for a Llama-style spec: losses fall, a checkpoint
    (version 13) resumes exactly, and it samples."""
    from llmgen.emit import emit, make
    from conftest import run_trainer, step_losses
    from llmgen import trainer_output
    spec = specs.from_dict({"name": "tiny-llama", "layers": 2, "heads": 4, "channels": 32, "vocab_size": 64,
                            "max_seq_len": 32, **LLAMA}, "test")
    emit(spec, tmp_path / "trainer")
    exe = make(tmp_path / "trainer")
    data = ["-i", tiny_data / "train_*.bin", "-j", tiny_data / "val_*.bin", "-b", 4, "-t", 16, "-l", 3e-3,
            "-v", 1000, "-s", 6, "-g", 8, "-d", 128]
    full = run_trainer(exe, *data, "-x", 6, "-o", tmp_path / "full")
    run_trainer(exe, *data, "-x", 6, "-n", 3, "-o", tmp_path / "part", "-s", 0)
    (tmp_path / "part" / "DONE_00000006").unlink()
    resumed = run_trainer(exe, *data, "-x", 6, "-y", 1, "-o", tmp_path / "part")
    a, b = step_losses(full.stdout), step_losses(resumed.stdout)
    assert "resuming from step 3" in resumed.stdout and all(a[s] == b[s] for s in (4, 5, 6)), (a, b)
    assert a[6] < a[1]
    spec_back, version = read_model_spec(tmp_path / "full" / "model_00000006.bin") if (
        tmp_path / "full" / "model_00000006.bin").exists() else read_model_spec(tmp_path / "part" / "model_00000003.bin")
    assert version == 13 and spec_back == spec
    assert len(trainer_output.samples(full.stdout)[0].split()) == 8
