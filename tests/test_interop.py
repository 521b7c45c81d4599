"""Weights in and out: Hugging Face GPT-2 (safetensors) import and export, --spec-from, and the
emitted trainer resuming from a checkpoint that went through Hugging Face's layout."""

import json
import math
import shutil
import struct
import tomllib

import numpy as np
import pytest

from llmgen import reference as ref
from llmgen import spec as specs
from llmgen.emit import emit, make
from llmgen.fileio import from_bf16, read_model, to_bf16, write_model, write_shard
from llmgen.hf import SafeTensors, write_safetensors
from llmgen.verify import rel_error

from conftest import llmgen, random_tokens, refused, run_trainer, step_losses

try:
    import safetensors.numpy as safetensors_numpy
except ImportError:
    safetensors_numpy = None
needs_safetensors = pytest.mark.skipif(safetensors_numpy is None, reason="the safetensors package (in the test "
                                       "extra: pip install '.[test]') builds the test models")

# Sizes of the synthetic Hugging Face models: odd heads, a vocab that needs padding.
L, NH, C, V, MAXT = 2, 3, 48, 100, 16


def hf_names(n_layer, prefix="transformer."):
    """GPT2LMHeadModel's state dict keys, less the tied lm_head.weight and the mask buffers."""
    names = [prefix + "wte.weight", prefix + "wpe.weight"]
    for n in range(n_layer):
        for part in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                     "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias"):
            names.append(f"{prefix}h.{n}.{part}")
    return names + [prefix + "ln_f.weight", prefix + "ln_f.bias"]


def hf_shapes(n_layer=L, channels=C, vocab=V, maxT=MAXT):
    """Shapes in Hugging Face's layout: Conv1D weights are (in, out)."""
    shapes = {"wte.weight": (vocab, channels), "wpe.weight": (maxT, channels),
              "ln_f.weight": (channels,), "ln_f.bias": (channels,)}
    per_block = {"ln_1.weight": (channels,), "ln_1.bias": (channels,), "ln_2.weight": (channels,),
                 "ln_2.bias": (channels,), "attn.c_attn.weight": (channels, 3 * channels),
                 "attn.c_attn.bias": (3 * channels,), "attn.c_proj.weight": (channels, channels),
                 "attn.c_proj.bias": (channels,), "mlp.c_fc.weight": (channels, 4 * channels),
                 "mlp.c_fc.bias": (4 * channels,), "mlp.c_proj.weight": (4 * channels, channels),
                 "mlp.c_proj.bias": (channels,)}
    for n in range(n_layer):
        shapes.update({f"h.{n}.{k}": v for k, v in per_block.items()})
    return shapes


def random_hf_tensors(seed=0, **sizes):
    """A random GPT-2 in Hugging Face's layout (short names), every tensor far from its init."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_shapes(**sizes).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[name] = rng.normal(0, 0.1 if name.endswith("bias") else 0.3, shape).astype(np.float32)
    return out


def gpt2_config_json(**overrides):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_positions": MAXT,
              "n_ctx": MAXT, "n_embd": C, "n_layer": L, "n_head": NH, "n_inner": None,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05}
    config.update(overrides)
    return config


def save_hf(d, tensors, prefix="transformer.", config=None, extra=None, dtype=np.float32):
    """A model dir as transformers writes it: model.safetensors (+ config.json)."""
    d.mkdir(parents=True, exist_ok=True)
    full = {prefix + k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}
    full.update(extra or {})
    safetensors_numpy.save_file(full, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def hf_forward(t, tokens, n_head):
    """GPT-2's forward straight from Hugging Face's tensors (float64): Conv1D is x @ W + b."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    n_layer = sum(1 for k in t if k.endswith("ln_1.weight"))
    B, T = tokens.shape
    Cn = t["wte.weight"].shape[1]
    hs = Cn // n_head

    def ln(x, prefix):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * t[prefix + ".weight"] + t[prefix + ".bias"]

    def conv1d(x, prefix):
        return x @ t[prefix + ".weight"] + t[prefix + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = t["wte.weight"][tokens] + t["wpe.weight"][:T]
    causal = np.triu(np.ones((T, T), dtype=bool), k=1)
    for n in range(n_layer):
        h = conv1d(ln(x, f"h.{n}.ln_1"), f"h.{n}.attn.c_attn")
        q, k, v = (a.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3) for a in np.split(h, 3, axis=-1))
        scores = np.where(causal, -np.inf, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs))
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, Cn)
        x = x + conv1d(y, f"h.{n}.attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(ln(x, f"h.{n}.ln_2"), f"h.{n}.mlp.c_fc")), f"h.{n}.mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T


def ref_logits(spec, params, tokens):
    logits, _, _ = ref.forward(spec, {k: v.astype(np.float64) for k, v in params.items()}, tokens)
    return logits


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def fails(result, message):
    """One clear line on stderr naming the problem, and exit status 1."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], (message, lines[0])
    return lines[0]


# ---- import ------------------------------------------------------------------------------
@needs_safetensors
@pytest.mark.parametrize("layout", ["GPT2LMHeadModel", "hub"])
def test_import_matches_the_hugging_face_forward(tmp_path, layout):
    t = random_hf_tensors(seed=1)
    if layout == "GPT2LMHeadModel":  # save_pretrained: prefixed names, the tied lm_head left out
        save_hf(tmp_path / "hf", t, "transformer.", gpt2_config_json())
    else:  # as on the hub: no prefix, the causal-mask buffers, and lm_head.weight written out
        mask = np.tril(np.ones((1, 1, MAXT, MAXT), dtype=np.float32))
        extra = {f"h.{n}.attn.bias": mask for n in range(L)} | {"h.0.attn.masked_bias": np.array(-1e4, np.float32),
                                                                "lm_head.weight": t["wte.weight"]}
        save_hf(tmp_path / "hf", t, "", gpt2_config_json(), extra)
    out = ok(llmgen("import-hf", tmp_path / "hf", "-o", tmp_path / "m.bin"))
    assert "version 3 (fp32)" in out and "vocab 100 padded to 128" in out
    printed = out[out.index('name = "m"'):]
    assert specs.from_dict(tomllib.loads(printed), "printed") == specs.from_dict(
        {"layers": L, "heads": NH, "channels": C, "vocab_size": V, "max_seq_len": MAXT}, "want")
    spec, params = read_model(tmp_path / "m.bin")
    assert spec.padded_vocab_size == 128 and not params["wte"][V:].any()
    tokens = random_tokens(2 * MAXT, V, seed=2).reshape(2, MAXT)
    ours = ref_logits(spec, params, tokens)[..., :V]
    theirs = hf_forward(t, tokens, NH)
    assert rel_error(ours, theirs) < 1e-12
    assert np.abs(theirs).max() > 1  # not a degenerate model


@needs_safetensors
@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_import_half_precision_files(tmp_path, dtype):
    t = random_hf_tensors(seed=3)
    if dtype == "F16":
        save_hf(tmp_path / "hf", t, "transformer.", gpt2_config_json(), dtype=np.float16)
        exact = {k: v.astype(np.float16).astype(np.float32) for k, v in t.items()}
    else:  # numpy has no bfloat16: write the file by hand
        exact = {k: from_bf16(to_bf16(v)) for k, v in t.items()}
        header, blobs, off = {}, [], 0
        for k, v in t.items():
            blob = to_bf16(v).tobytes()
            header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(blob)]}
            blobs.append(blob)
            off += len(blob)
        text = json.dumps(header).encode()
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
        (tmp_path / "hf" / "config.json").write_text(json.dumps(gpt2_config_json()))
    ok(llmgen("import-hf", tmp_path / "hf", "-o", tmp_path / "m.bin"))
    _, params = read_model(tmp_path / "m.bin")
    assert np.array_equal(params["qkvw"][1], exact["h.1.attn.c_attn.weight"].T)
    assert np.array_equal(params["wte"][:V], exact["wte.weight"])


@needs_safetensors
def test_import_without_config_and_a_file_argument(tmp_path):
    t = random_hf_tensors(seed=4, channels=128)  # head size 64 assumed without config.json: 2 heads
    save_hf(tmp_path / "hf", t, "")
    out = ok(llmgen("import-hf", tmp_path / "hf" / "model.safetensors", "-o", tmp_path / "a.bin", "--dtype", "bf16"))
    assert "no config.json" in out and "2 heads" in out and "version 5 (bf16)" in out
    spec, params, version = read_model(tmp_path / "a.bin", with_version=True)
    assert (spec.n_head, spec.n_embd, version) == (2, 128, 5)
    assert np.array_equal(params["fcprojw"][0], from_bf16(to_bf16(t["h.0.mlp.c_proj.weight"].T)))
    ok(llmgen("import-hf", tmp_path / "hf", "-o", tmp_path / "b.bin", "--heads", 4))
    assert read_model(tmp_path / "b.bin")[0].n_head == 4


# ---- export ------------------------------------------------------------------------------
@needs_safetensors
def test_export_writes_gpt2lmheadmodel_layout(tmp_path):
    spec = specs.load("test-odd")
    params = ref.init_params(spec, seed=5)
    params["wte"][spec.vocab_size:] = 0
    write_model(tmp_path / "m.bin", spec, params)
    out = ok(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "hf"))
    assert "dropped the 31 padded vocab rows of wte (all zero" in out
    # the safetensors package reads what our writer wrote
    loaded = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(loaded) == sorted(hf_names(spec.n_layer))
    shapes = hf_shapes(spec.n_layer, spec.n_embd, spec.vocab_size, spec.max_seq_len)
    assert {k: v.shape for k, v in loaded.items()} == {"transformer." + k: v for k, v in shapes.items()}
    assert all(v.dtype == np.float32 for v in loaded.values())
    assert np.array_equal(loaded["transformer.h.1.mlp.c_fc.weight"], params["fcw"][1].T)
    assert np.array_equal(loaded["transformer.wte.weight"], params["wte"][:spec.vocab_size])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["vocab_size"], config["n_positions"]) == (
        spec.n_layer, spec.n_head, spec.n_embd, spec.vocab_size, spec.max_seq_len)
    assert config["tie_word_embeddings"] is True and "llmgen_padded_vocab_size" not in config
    # and our reader reads what the package writes
    safetensors_numpy.save_file(loaded, str(tmp_path / "pkg.safetensors"))
    st = SafeTensors(tmp_path / "pkg.safetensors")
    assert all(np.array_equal(st.get(k), v) for k, v in loaded.items())
    # the exported model computes what the checkpoint computes
    tokens = random_tokens(2 * 24, spec.vocab_size, seed=6).reshape(2, 24)
    short = {k.removeprefix("transformer."): v for k, v in loaded.items()}
    assert rel_error(hf_forward(short, tokens, spec.n_head), ref_logits(spec, params, tokens)[..., :spec.vocab_size]) < 1e-12


@pytest.mark.parametrize("version", [3, 5])
def test_export_then_import_is_the_identity(tmp_path, version):
    for name in ("test-odd", "test-tiny"):  # test-tiny's vocab 64 is padded to 64, not 128
        spec = specs.load(name)
        params = ref.init_params(spec, seed=7)
        params["wte"][spec.vocab_size:] = 0
        write_model(tmp_path / f"{name}.bin", spec, params, version)
        ok(llmgen("export-hf", tmp_path / f"{name}.bin", "-o", tmp_path / name))
        dtype = ["--dtype", "bf16"] if version == 5 else []
        ok(llmgen("import-hf", tmp_path / name, "-o", tmp_path / name / f"{name}.bin", *dtype))
        assert (tmp_path / name / f"{name}.bin").read_bytes() == (tmp_path / f"{name}.bin").read_bytes(), name


def test_transformers_loads_the_export(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed: no comparison with GPT2LMHeadModel")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    spec = specs.load("test-odd")
    params = ref.init_params(spec, seed=8)
    write_model(tmp_path / "m.bin", spec, params)
    ok(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "hf"))
    model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = random_tokens(2 * 24, spec.vocab_size, seed=9).reshape(2, 24)
    with torch.no_grad():
        theirs = model.eval()(torch.tensor(tokens)).logits.double().numpy()
    assert rel_error(theirs, ref_logits(spec, params, tokens)[..., :spec.vocab_size]) < 1e-5


# ---- the emitted trainer ------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("test-odd")
    emit(specs.load("test-odd"), out)
    return make(out)


def test_trained_checkpoint_round_trips_and_resumes(odd_trainer, tiny_data, tmp_path):
    """A checkpoint trained by the C program goes out to Hugging Face's layout and back bit for
    bit, and the program resumes from the imported copy as from the original."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["-i", tiny_data / "train_*.bin", "-j", tiny_data / "val_*.bin", "-b", 4, "-t", 16, "-v", 1000,
            "-s", 0, "-l", 3e-3, "-c", 0.1, "-x", 6, "-n", 3]
    straight = run_trainer(odd_trainer, *args, "-o", full)
    model = full / "model_00000003.bin"
    spec, params = read_model(model)
    assert not params["wte"][spec.vocab_size:].any()  # padded rows: zero at init, and they stay zero
    ok(llmgen("export-hf", model, "-o", tmp_path / "hf"))
    ok(llmgen("import-hf", tmp_path / "hf", "-o", tmp_path / "imported.bin"))
    assert (tmp_path / "imported.bin").read_bytes() == model.read_bytes()
    part.mkdir()
    shutil.copy(tmp_path / "imported.bin", part / "model_00000003.bin")
    for name in ["DONE_00000003", "state_00000003_00000.bin", "main.log"]:
        shutil.copy(full / name, part / name)
    resumed = run_trainer(odd_trainer, *args, "-o", part, "-y", 1)
    a, b = step_losses(straight.stdout), step_losses(resumed.stdout)
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b), (a, b)


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_file_gets_its_trainer_with_spec_from(tmp_path, version):
    """A checkpoint written elsewhere (by hand here, as llm.c's Python writes it) with sizes of
    no preset: --spec-from emits a trainer that loads it and computes its loss."""
    Lx, NHx, Cx, Vx, Vpx, Tx = 1, 2, 16, 50, 128, 8
    spec = specs.from_dict({"layers": Lx, "heads": NHx, "channels": Cx, "vocab_size": Vx,
                            "padded_vocab_size": Vpx, "max_seq_len": Tx}, "elsewhere")
    params = ref.init_params(spec, seed=10)
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, version, Tx, Vx, Lx, NHx, Cx, Vpx]
    flat = np.concatenate([params[k].ravel() for k in params])
    body = flat.astype("<f4").tobytes() if version == 3 else to_bf16(flat).tobytes()
    ckpt = tmp_path / "gpt2_elsewhere.bin"
    ckpt.write_bytes(header.tobytes() + body)
    info = ok(llmgen("info", "--spec-from", ckpt))
    assert "1 layers, 2 heads of 8, 16 channels, vocab 50 padded to 128, max_seq_len 8" in info
    ok(llmgen("emit", "--spec-from", ckpt, "-o", tmp_path / "build", "--build"))
    assert "from checkpoint gpt2_elsewhere.bin" in (tmp_path / "build" / "train_gpt2.c").read_text()
    tokens = random_tokens(500, Vx, seed=11)
    write_shard(tmp_path / "train.bin", tokens)
    result = run_trainer(tmp_path / "build" / "train_gpt2", "-i", tmp_path / "train.bin", "-j", tmp_path / "train.bin",
                         "-e", ckpt, "-b", 2, "-t", Tx, "-x", 1, "-v", 1000, "-s", 0)
    stored = {k: v.astype(np.float64) for k, v in read_model(ckpt)[1].items()}
    _, loss, _ = ref.forward(spec, stored, tokens[:2 * Tx].reshape(2, Tx), tokens[1:2 * Tx + 1].reshape(2, Tx))
    assert abs(step_losses(result.stdout)[1] - loss) < 1e-5


# ---- bad input ---------------------------------------------------------------------------
def test_spec_from_errors(tmp_path):
    spec = specs.load("test-tiny")
    write_model(tmp_path / "m.bin", spec, ref.init_params(spec))
    ok(llmgen("info", "--spec-from", tmp_path / "m.bin", "--spec", "test-tiny", "--layers", 2))
    fails(llmgen("info", "--spec-from", tmp_path / "m.bin", "--spec", "test-odd"),
          "the checkpoint's sizes differ from --spec test-odd (checkpoint vs given): heads 2 vs 3")
    fails(llmgen("emit", "--spec-from", tmp_path / "m.bin", "--layers", 3), "differ from --layers 3 (checkpoint vs given): layers 2 vs 3")
    fails(llmgen("emit", "--spec-from", tmp_path / "missing.bin"), "no such model checkpoint")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-4])
    fails(llmgen("info", "--spec-from", tmp_path / "cut.bin"), "cut.bin: model checkpoint holds")


@needs_safetensors
def test_import_errors(tmp_path):
    t = random_hf_tensors(seed=12)
    config = gpt2_config_json()

    def case(name, tensors=t, cfg=config, prefix="transformer.", extra=None):
        return save_hf(tmp_path / name, tensors, prefix, cfg, extra)

    def imp(d, *args):
        return llmgen("import-hf", d, "-o", tmp_path / "out.bin", *args)

    missing = {k: v for k, v in t.items() if k != "h.1.mlp.c_fc.bias"}
    fails(imp(case("missing", missing)), "missing tensor h.1.mlp.c_fc.bias (or transformer.h.1.mlp.c_fc.bias)")
    wrong = dict(t, **{"h.0.attn.c_attn.weight": t["h.0.attn.c_attn.weight"].T})  # stored (out, in)
    fails(imp(case("shape", wrong)), "tensor transformer.h.0.attn.c_attn.weight has shape [144, 48], expected [48, 144]")
    fails(imp(case("mistral", cfg=dict(config, model_type="mistral", architectures=["MistralForCausalLM"]))),
          "model_type 'mistral' with architectures ['MistralForCausalLM'] is neither GPT-2 nor Llama")
    fails(imp(case("gpt2-arch", cfg=dict(config, architectures=["LlamaForCausalLM"]))),
          "model_type 'gpt2' with architectures ['LlamaForCausalLM'] is not GPT-2")
    fails(imp(case("gelu", cfg=dict(config, activation_function="relu"))), "activation_function 'relu'")
    fails(imp(case("layers", cfg=dict(config, n_layer=3))), "n_layer is 3, but the tensors")
    fails(imp(case("extra", extra={"score.weight": np.zeros((2, C), np.float32)})), "unexpected tensor score.weight")
    fails(imp(case("untied", extra={"lm_head.weight": t["wte.weight"] + 1})),
          "lm_head.weight differs from transformer.wte.weight, but")
    d = case("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    fails(imp(d), "truncated safetensors file (tensor")
    (d / "model.safetensors").write_bytes(data[:20])
    fails(imp(d), "truncated safetensors file (its header needs")
    (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"not json at all!")
    fails(imp(d), "not a safetensors file")
    (d / "model.safetensors").write_bytes(data)
    (d / "config.json").write_text("{")
    fails(imp(d), "config.json: not valid JSON")
    fails(imp(tmp_path / "nowhere"), "no such file or dir")
    (tmp_path / "empty").mkdir()
    fails(imp(tmp_path / "empty"), "no model.safetensors in this dir, nor a model.safetensors.index.json")
    fails(imp(case("noconfig", cfg=None), "--heads", 5), "'channels': 48 is not divisible by heads 5")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    fails(llmgen("import-hf", case("good"), "-o", blocker / "out.bin"), "cannot write")
    assert not (tmp_path / "out.bin").exists()


def test_export_errors(tmp_path):
    spec = specs.load("test-tiny")
    write_model(tmp_path / "m.bin", spec, ref.init_params(spec))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    fails(llmgen("export-hf", tmp_path / "m.bin", "-o", blocker / "hf"), "cannot write")
    fails(llmgen("export-hf", tmp_path / "m.bin", "-o", blocker), "blocker: cannot write the export there (not a directory)")
    fails(llmgen("export-hf", tmp_path / "missing.bin", "-o", tmp_path / "hf"), "no such model checkpoint")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-4])
    fails(llmgen("export-hf", tmp_path / "cut.bin", "-o", tmp_path / "hf"), "model checkpoint holds")
    assert not (tmp_path / "hf").exists()


@needs_safetensors
def test_safetensors_writer_round_trip(tmp_path):
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array(1.5, np.float32),
               "empty": np.zeros((0, 4), np.float32)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    data = (tmp_path / "x.safetensors").read_bytes()
    assert struct.unpack("<Q", data[:8])[0] % 8 == 0
    loaded = safetensors_numpy.load_file(str(tmp_path / "x.safetensors"))
    assert set(loaded) == set(tensors) and all(np.array_equal(loaded[k], v) for k, v in tensors.items())
    st = SafeTensors(tmp_path / "x.safetensors")
    assert st.metadata == {"format": "pt"} and st.get("b").tolist() == tensors["b"].tolist()


# ---- crafted input -----------------------------------------------------------------------
def crafted_safetensors(path, header, data=b"\0" * 64):
    """A safetensors file with any header: a dict or list (as JSON), or the header's bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


@pytest.mark.parametrize("header, field", [
    ({"w": entry(dtype=5)}, "w: dtype"),
    ({"w": entry(dtype=None)}, "w: dtype"),
    ({"w": entry(shape="22")}, "w: shape"),
    ({"w": entry(shape=[2.0, 2])}, "w: shape"),
    ({"w": entry(shape=[True, 4])}, "w: shape"),
    ({"w": entry(shape=[-2, -2])}, "w: shape"),
    ({"w": entry(shape={"a": 1})}, "w: shape"),
    ({"w": entry(shape=[2 ** 70, 2 ** 70], offsets=(0, 0))}, "w: "),      # beyond int64
    ({"w": entry(shape=[2 ** 32, 2 ** 32], offsets=(0, 0))}, "w: "),      # wraps to 0 in int64
    ({"w": entry(offsets=[0])}, "w: data_offsets"),
    ({"w": entry(offsets=[0, "16"])}, "w: data_offsets"),
    ({"w": entry(offsets=[16, 0])}, "w: data_offsets"),
    ({"w": entry(offsets=[0, 16, 32])}, "w: data_offsets"),
    ({"w": entry(offsets=[-16, 0])}, "w: data_offsets"),
    ({"w": entry(offsets=[False, 16])}, "w: data_offsets"),
    ({"w": entry(offsets=None)}, "w: data_offsets"),
    ({"w": entry(offsets=(0, 2 ** 80))}, "tensor w ends at byte"),          # past the end of the file
    ({"w": entry(offsets=(48, 64)), "v": entry(offsets=(56, 72))}, "v ends at byte"),
    ({"w": entry(), "v": entry(offsets=(8, 24))}, "overlap"),
    ({"w": entry(), "v": entry(offsets=(0, 16))}, "overlap"),
    ({"w": 5}, "tensor w: header entry"),
    ({"w": [1, 2]}, "tensor w: header entry"),
    ({"w": {"dtype": "F32", "shape": [2, 2]}}, "w: data_offsets"),
    ({"w": {}}, "w: dtype"),
    ({"w\nx": entry()}, "tensor name"),
    ({"__metadata__": 5, "w": entry()}, "__metadata__"),
    ({"__metadata__": {"format": 1}, "w": entry()}, "__metadata__"),
    ({"__metadata__": ["pt"], "w": entry()}, "__metadata__"),
    ([1, 2], "not a JSON object"),
    ("header", "not a JSON object"),
    (None, "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "not a safetensors file"),           # too deep for json
    (b"\xff\xfe", "not a safetensors file"),
])
def test_crafted_safetensors_headers_are_refused(tmp_path, header, field):
    path = crafted_safetensors(tmp_path / "m" / "crafted.safetensors", header)
    refused(llmgen("import-hf", path, "-o", tmp_path / "out.bin"), f"{path}: ", field)
    assert not (tmp_path / "out.bin").exists()


def valid_hf_dir(d, **config_overrides):
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors(d / "model.safetensors", {"transformer." + k: v for k, v in random_hf_tensors().items()})
    config = gpt2_config_json(**config_overrides)
    (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not DROP}))
    return d


DROP = object()


@pytest.mark.parametrize("key, value", [
    ("n_head", "3"), ("n_head", 3.0), ("n_head", None), ("n_head", True), ("n_embd", 7.5), ("n_embd", "48"),
    ("vocab_size", None), ("vocab_size", [100]), ("n_layer", True), ("n_positions", {"a": 1}), ("n_inner", "192"),
    ("architectures", "GPT2LMHeadModel"), ("architectures", 5), ("architectures", [["GPT2LMHeadModel"]]),
    ("architectures", {"GPT2LMHeadModel": 1}), ("model_type", ["gpt2"]), ("activation_function", 5),
    ("activation_function", ["gelu_new"]), ("layer_norm_epsilon", "1e-5"), ("layer_norm_epsilon", True),
    ("scale_attn_weights", "false"), ("scale_attn_weights", 0), ("add_cross_attention", "true"),
    ("scale_attn_by_inverse_layer_idx", "no"), ("llmgen_padded_vocab_size", "128"),
])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, key, value):
    d = valid_hf_dir(tmp_path / "hf", **{key: value})
    refused(llmgen("import-hf", d, "-o", tmp_path / "out.bin"), f"{d / 'config.json'}: {key}")
    assert not (tmp_path / "out.bin").exists()


def test_config_that_is_deeply_nested_or_not_an_object(tmp_path):
    d = valid_hf_dir(tmp_path / "hf")
    for text in ["[" * 100_000 + "]" * 100_000, '{"n_head": ' + "[" * 100_000 + "]" * 100_000 + "}", "[1]", "5"]:
        (d / "config.json").write_text(text)
        refused(llmgen("import-hf", d, "-o", tmp_path / "out.bin"), f"{d / 'config.json'}: ")
    # the crafted files' valid twin imports (architectures may be null; n_inner null or 4C)
    valid_hf_dir(d, architectures=None, n_inner=4 * C)
    ok(llmgen("import-hf", d, "-o", tmp_path / "out.bin"))


def test_safetensors_claiming_more_blocks_than_it_holds(tmp_path):
    """h.99999999.* makes 10^8 blocks: refused for the missing ones before anything is allocated."""
    t = {"transformer." + k: v for k, v in random_hf_tensors().items()}
    t["transformer.h.99999999.ln_1.weight"] = t["transformer.h.0.ln_1.weight"]
    write_safetensors(tmp_path / "m.safetensors", t)
    refused(llmgen("import-hf", tmp_path / "m.safetensors", "-o", tmp_path / "out.bin", "--heads", NH),
            "missing tensor h.2.ln_1.weight")


def test_import_names_the_spec_after_the_output_plainly(tmp_path):
    d = valid_hf_dir(tmp_path / "hf")
    out = ok(llmgen("import-hf", d, "-o", tmp_path / "my model (2).bin"))
    assert 'name = "my_model__2_"' in out
    ok(llmgen("info", "--spec-from", tmp_path / "my model (2).bin"))


def test_safetensors_entries_in_any_order_and_empty_tensors_load(tmp_path):
    a, b = np.arange(4, dtype="<f4"), np.arange(6, dtype="<f4") + 10
    header = {"b": entry(shape=(2, 3), offsets=(16, 40)), "empty": entry(shape=(0, 5), offsets=(16, 16)),
              "a": entry(shape=(4,), offsets=(0, 16)), "__metadata__": {"format": "pt"}}
    path = crafted_safetensors(tmp_path / "x.safetensors", header, a.tobytes() + b.tobytes())
    st = SafeTensors(path)
    assert st.get("a").tolist() == a.tolist() and st.get("b").tolist() == b.reshape(2, 3).tolist()
    assert st.get("empty").shape == (0, 5)
