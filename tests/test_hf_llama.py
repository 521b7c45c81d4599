"""Hugging Face Llama in and out: import-hf of transformers' LlamaForCausalLM (single-file and
sharded safetensors, float32/float16/bfloat16) checked against an independent NumPy forward in
transformers' own layout and conventions, export-hf of a llama-family checkpoint, the round
trip, the refusals; and, when torch and transformers are installed, transformers itself."""

import json
import tomllib

import numpy as np
import pytest

from llmgen import reference as ref
from llmgen import spec as specs
from llmgen.fileio import from_bf16, read_model, to_bf16, write_model
from llmgen.hf import SafeTensors
from llmgen.tensors import hf_family, parameters
from llmgen.verify import rel_error

from conftest import llmgen, random_tokens, refused

# Sizes of the synthetic Llamas: 6 heads of 8, an odd MLP hidden size, a vocab that needs padding.
L, C, NH, KVH, H, V, MAXT = 2, 48, 6, 2, 37, 97, 32
DROP = object()


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ---- synthetic Llamas in transformers' layout ---------------------------------------------
def llama_config(**overrides):
    """config.json as transformers 5 writes it for LlamaForCausalLM (DROP leaves a key out)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": C,
              "intermediate_size": H, "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": KVH,
              "head_dim": C // NH, "hidden_act": "silu", "max_position_embeddings": MAXT, "rms_norm_eps": 1e-5,
              "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "attention_bias": False,
              "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1, "tie_word_embeddings": True,
              "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32"}
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not DROP}


def llama_shapes(config):
    c, h, nh = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = (config.get("num_key_value_heads") or nh) * (c // nh)
    bias = config.get("attention_bias", False)
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], c), "model.norm.weight": (c,)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (c,), p + "post_attention_layernorm.weight": (c,),
                       p + "self_attn.q_proj.weight": (c, c), p + "self_attn.k_proj.weight": (kv, c),
                       p + "self_attn.v_proj.weight": (kv, c), p + "self_attn.o_proj.weight": (c, c),
                       p + "mlp.gate_proj.weight": (h, c), p + "mlp.up_proj.weight": (h, c),
                       p + "mlp.down_proj.weight": (c, h)})
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (c,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (c,),
                           p + "mlp.gate_proj.bias": (h,), p + "mlp.up_proj.bias": (h,), p + "mlp.down_proj.bias": (c,)})
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], c)
    return shapes


def llama_tensors(config, seed=0):
    """A random LlamaForCausalLM's state dict (as save_pretrained writes it), far from its init."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in llama_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[name] = rng.normal(0, 0.1 if name.endswith("bias") else 0.25, shape).astype(np.float32)
    return out


def safetensors_bytes(tensors, dtype="F32", metadata=None):
    """A safetensors file's bytes, written here (not with our writer, nor the package)."""
    header, blobs, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, a in tensors.items():
        a = np.asarray(a, np.float32)
        blob = {"F32": lambda: a.astype("<f4").tobytes(), "F16": lambda: a.astype("<f2").tobytes(),
                "BF16": lambda: to_bf16(a).tobytes()}[dtype]()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def stored(a, dtype):
    """The float32 values a tensor has once stored as dtype."""
    return {"F32": lambda: a, "F16": lambda: a.astype(np.float16).astype(np.float32),
            "BF16": lambda: from_bf16(to_bf16(a))}[dtype]()


def save_llama(d, tensors, config, dtype="F32", shards=1):
    """A model dir as save_pretrained writes it: model.safetensors, or with shards > 1
    model-0000i-of-0000N.safetensors and model.safetensors.index.json; and config.json."""
    d.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        (d / "model.safetensors").write_bytes(safetensors_bytes(tensors, dtype, {"format": "pt"}))
    else:
        names = list(tensors)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i::shards]}
            (d / file).write_bytes(safetensors_bytes(part, dtype, {"format": "pt"}))
            weight_map.update({k: file for k in part})
        total = sum(a.size for a in tensors.values()) * {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


# ---- Llama's forward, as transformers' modeling_llama computes it -------------------------
def llama_forward(t, tokens, config):
    """LlamaForCausalLM's logits from its own tensors, in float64, step by step as
    transformers' modeling_llama: LlamaRMSNorm, LlamaRotaryEmbedding (inv_freq, cat(freqs,
    freqs)), rotate_half and apply_rotary_pos_emb, repeat_kv, eager attention, LlamaMLP."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    eps = config.get("rms_norm_eps", 1e-6)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    B, T = tokens.shape

    def rmsnorm(x, weight):  # LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), then * weight
        variance = (x ** 2).mean(-1, keepdims=True)
        return weight * (x * (1.0 / np.sqrt(variance + eps)))

    def linear(x, name):  # nn.Linear: x @ W.T + b
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def rotate_half(x):
        x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return np.concatenate([-x2, x1], axis=-1)

    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[None, None], np.sin(emb)[None, None]  # unsqueeze(1): (1, 1, T, head_dim)

    def apply_rotary_pos_emb(q, k):
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def repeat_kv(x, n_rep):
        b, kv_heads, slen, dim = x.shape
        return np.broadcast_to(x[:, :, None], (b, kv_heads, n_rep, slen, dim)).reshape(b, kv_heads * n_rep, slen, dim)

    def silu(x):
        return x / (1.0 + np.exp(-x))

    mask = np.triu(np.full((T, T), -np.inf), k=1)
    h = t["model.embed_tokens.weight"][tokens]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        x = rmsnorm(h, t[p + "input_layernorm.weight"])
        q, k, v = (linear(x, p + f"self_attn.{w}_proj").reshape(B, T, -1, head_dim).transpose(0, 2, 1, 3)
                   for w in "qkv")
        q, k = apply_rotary_pos_emb(q, k)
        k, v = repeat_kv(k, n_head // n_kv), repeat_kv(v, n_head // n_kv)
        w = q @ k.transpose(0, 1, 3, 2) * head_dim ** -0.5 + mask
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        h = h + linear((w @ v).transpose(0, 2, 1, 3).reshape(B, T, -1), p + "self_attn.o_proj")
        x = rmsnorm(h, t[p + "post_attention_layernorm.weight"])
        h = h + linear(silu(linear(x, p + "mlp.gate_proj")) * linear(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = rmsnorm(h, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if config.get("tie_word_embeddings", False) else t["lm_head.weight"]
    return h @ head.T


def ref_logits(spec, params, tokens):
    logits, _, _ = ref.forward(spec, {k: v.astype(np.float64) for k, v in params.items()}, tokens)
    return logits


def check_import(tmp_path, tensors, config, dtype="F32", shards=1, seed=2):
    """Import the model; our reference on the checkpoint gives transformers' logits (float64)."""
    d = save_llama(tmp_path / "hf", tensors, config, dtype, shards)
    out = ok(llmgen("import-hf", d, "-o", tmp_path / "m.bin"))
    spec, params, version = read_model(tmp_path / "m.bin", with_version=True)
    assert version == 13 and hf_family(spec) == "llama"
    assert specs.from_dict(tomllib.loads(out[out.index('name = "m"'):]), "printed") == spec
    Vp = spec.padded_vocab_size
    assert not params["wte"][config["vocab_size"]:].any()
    if "lm_head" in params:
        assert not params["lm_head"][config["vocab_size"]:].any()
    tokens = random_tokens(2 * 16, config["vocab_size"], seed=seed).reshape(2, 16)
    exact = {k: stored(v, dtype) for k, v in tensors.items()}
    theirs = llama_forward(exact, tokens, config)
    ours = ref_logits(spec, params, tokens)
    assert ours.shape[-1] == Vp
    assert rel_error(ours[..., :config["vocab_size"]], theirs) < 1e-12
    assert np.abs(theirs).max() > 1  # not a degenerate model
    return spec, params, out


# ---- import ------------------------------------------------------------------------------
@pytest.mark.parametrize("tied, kv_heads, bias", [
    (True, 2, False),    # grouped-query, tied: save_pretrained leaves lm_head.weight out
    (False, 2, False),   # untied lm_head
    (False, 1, True),    # multi-query, every linear layer with a bias
    (True, 6, True),     # plain multi-head
])
def test_import_matches_the_transformers_forward(tmp_path, tied, kv_heads, bias):
    config = llama_config(tie_word_embeddings=tied, num_key_value_heads=kv_heads, attention_bias=bias, mlp_bias=bias)
    spec, params, out = check_import(tmp_path, llama_tensors(config, seed=1), config)
    assert "version 13 (fp32)" in out and "vocab 97 padded to 128" in out
    assert (spec.n_layer, spec.n_head, spec.n_embd, spec.kv_head_count, spec.mlp_channels) == (L, NH, C, kv_heads, H)
    assert (spec.norm_eps, spec.rope_theta, spec.bias, spec.tie_embeddings) == (1e-5, 500.0, bias, tied)
    assert spec.max_seq_len == MAXT and spec.name == "m"
    assert ("lm_head" in params) == (not tied)


def test_import_reads_the_q_and_k_rows_as_they_are(tmp_path):
    """transformers' q_proj/k_proj rows are already in the rotate-half layout: copied, stacked
    q, k, v (and gate, up), never permuted."""
    config = llama_config(num_key_value_heads=3)
    t = llama_tensors(config, seed=3)
    d = save_llama(tmp_path / "hf", t, config)
    ok(llmgen("import-hf", d, "-o", tmp_path / "m.bin"))
    _, params = read_model(tmp_path / "m.bin")
    p = "model.layers.1."
    want = np.concatenate([t[p + "self_attn.q_proj.weight"], t[p + "self_attn.k_proj.weight"],
                           t[p + "self_attn.v_proj.weight"]])
    assert np.array_equal(params["qkvw"][1], want)
    assert np.array_equal(params["fcw"][1], np.concatenate([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]))
    assert np.array_equal(params["fcprojw"][1], t[p + "mlp.down_proj.weight"])


def test_import_old_style_config(tmp_path):
    """transformers 4's keys: rope_theta at the top, rope_scaling null, torch_dtype; absent keys
    take LlamaConfig's defaults (rms_norm_eps 1e-6, untied, no biases, 2048 positions)."""
    config = llama_config(rope_parameters=DROP, rope_theta=20000.0, rope_scaling=None, torch_dtype="float32",
                          dtype=DROP, rms_norm_eps=DROP, tie_word_embeddings=DROP, attention_bias=DROP, mlp_bias=DROP,
                          head_dim=DROP, max_position_embeddings=DROP, num_key_value_heads=None)
    spec, _, _ = check_import(tmp_path, llama_tensors(config, seed=4), config)
    assert (spec.rope_theta, spec.norm_eps, spec.tie_embeddings, spec.bias) == (20000.0, 1e-6, False, False)
    assert (spec.max_seq_len, spec.kv_head_count) == (2048, NH)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_import_half_precision_and_sharded_files(tmp_path, dtype, shards):
    config = llama_config(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    t = llama_tensors(config, seed=5)
    _, params, out = check_import(tmp_path, t, config, dtype=dtype, shards=shards)
    assert ("3 shards listed in" in out) == (shards == 3)
    assert np.array_equal(params["qkvb"][0][:C], stored(t["model.layers.0.self_attn.q_proj.bias"], dtype))
    assert np.array_equal(params["lm_head"][:V], stored(t["lm_head.weight"], dtype))


def test_import_of_a_sharded_model_by_its_index_file(tmp_path):
    config = llama_config()
    d = save_llama(tmp_path / "hf", llama_tensors(config, seed=6), config, shards=2)
    ok(llmgen("import-hf", d, "-o", tmp_path / "a.bin"))
    ok(llmgen("import-hf", d / "model.safetensors.index.json", "-o", tmp_path / "b.bin"))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_import_of_a_sharded_gpt2(tmp_path):
    """The shards are read for GPT-2 too (the same reader)."""
    from test_interop import gpt2_config_json, random_hf_tensors
    t = {"transformer." + k: v for k, v in random_hf_tensors(seed=22).items()}
    save_llama(tmp_path / "sharded", t, gpt2_config_json(), shards=2)
    save_llama(tmp_path / "single", t, gpt2_config_json())
    ok(llmgen("import-hf", tmp_path / "sharded", "-o", tmp_path / "a.bin"))
    ok(llmgen("import-hf", tmp_path / "single", "-o", tmp_path / "b.bin"))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_import_tied_model_with_lm_head_written_out(tmp_path):
    config = llama_config(tie_word_embeddings=True)
    t = llama_tensors(config, seed=7)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()  # some hub files hold it anyway
    check_import(tmp_path, t, config)


def test_import_notes_what_does_not_change_the_model(tmp_path):
    config = llama_config(attention_dropout=0.1, pretraining_tp=2)
    d = save_llama(tmp_path / "hf", llama_tensors(config), config)
    out = ok(llmgen("import-hf", d, "-o", tmp_path / "m.bin", "--dtype", "bf16"))
    assert "attention_dropout 0.1 is not used: dropout is off at inference, and the trainer has none" in out
    assert "pretraining_tp 2 does not change the model" in out
    assert "version 15 (bf16)" in out


def test_import_caps_the_context(tmp_path):
    big = 2 ** 31 // C + 1  # max_seq_len x channels just over 2**31 - 1
    config = llama_config(max_position_embeddings=big)
    d = save_llama(tmp_path / "hf", llama_tensors(config), config)
    refused(llmgen("import-hf", d, "-o", tmp_path / "m.bin"), "config.json: max_position_embeddings 44739243 is too "
            "large for the trainer", "pass --max-seq-len (at most 44,739,242)")
    out = ok(llmgen("import-hf", d, "-o", tmp_path / "m.bin", "--max-seq-len", 4096))
    assert "context capped at --max-seq-len 4096 (max_position_embeddings is 44739243)" in out
    assert read_model(tmp_path / "m.bin")[0].max_seq_len == 4096
    refused(llmgen("import-hf", d, "-o", tmp_path / "m.bin", "--max-seq-len", big + 1),
            f"--max-seq-len {big + 1} is more than max_position_embeddings {big}")


def test_import_padded_vocab_size(tmp_path):
    config = llama_config(vocab_size=300)
    d = save_llama(tmp_path / "hf", llama_tensors(config), config)
    out = ok(llmgen("import-hf", d, "-o", tmp_path / "m.bin", "--padded-vocab-size", 320))
    assert "vocab 300 padded to 320" in out
    ok(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["llmgen_padded_vocab_size"] == 320


# ---- export ------------------------------------------------------------------------------
LLAMA_SPECS = {
    "gqa-tied": dict(kv_heads=2, mlp_hidden=37),
    "mqa-untied-bias": dict(kv_heads=1, bias=True, tie_embeddings=False, norm_eps=1e-6, rope_theta=500000.0),
    "mha-padding": dict(vocab_size=100, padded_vocab_size=256, tie_embeddings=False),
}


def llama_spec(name):
    raw = {"name": name, "layers": L, "heads": NH, "channels": C, "vocab_size": V, "max_seq_len": 24,
           "norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "bias": False}
    raw.update(LLAMA_SPECS[name])
    return specs.from_dict(raw, name)


def random_checkpoint(path, spec, seed, version=3):
    params = ref.init_params(spec, seed=seed)
    for name in ("wte", "lm_head"):
        if name in params:
            params[name][spec.vocab_size:] = 0  # the padded rows: zero, as the trainer keeps them
    params["ln1w"] += np.random.default_rng(seed).normal(0, 0.1, params["ln1w"].shape).astype(np.float32)
    write_model(path, spec, params, version)
    return read_model(path)[1]


def test_export_writes_llamaforcausallm_layout(tmp_path):
    spec = llama_spec("mqa-untied-bias")
    params = random_checkpoint(tmp_path / "m.bin", spec, seed=8)
    out = ok(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "hf"))
    assert "version 13 (fp32), 2 layers, 6 heads (1 kv heads), 48 channels" in out
    assert "dropped the 31 padded vocab rows of wte and lm_head (all zero" in out
    assert "(LlamaForCausalLM)" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": C,
        "intermediate_size": 4 * C, "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": 1,
        "head_dim": C // NH, "hidden_act": "silu", "max_position_embeddings": 24, "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "rope_scaling": None, "attention_bias": True, "mlp_bias": True, "attention_dropout": 0.0, "pretraining_tp": 1,
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True, "bos_token_id": None,
        "eos_token_id": None, "torch_dtype": "float32"}
    st = SafeTensors(tmp_path / "hf" / "model.safetensors")
    shapes = llama_shapes(config)
    assert {k: v[1] for k, v in st.entries.items()} == shapes
    assert all(v[0] == "F32" for v in st.entries.values())
    assert np.array_equal(st.get("lm_head.weight"), params["lm_head"][:V])
    assert np.array_equal(st.get("model.layers.1.self_attn.v_proj.bias"), params["qkvb"][1][C + 8:])
    # the export computes what the checkpoint computes
    tokens = random_tokens(2 * 24, V, seed=9).reshape(2, 24)
    theirs = llama_forward({k: st.get(k) for k in st.entries}, tokens, config)
    assert rel_error(theirs, ref_logits(spec, params, tokens)[..., :V]) < 1e-12


def test_export_of_a_gpt2_vocab_names_its_end_of_text(tmp_path):
    spec = specs.from_dict({"layers": 1, "heads": 2, "channels": 16, "vocab_size": 50257, "max_seq_len": 8,
                            "norm": "rmsnorm", "position": "rope", "mlp": "swiglu"}, "gpt2-vocab")
    random_checkpoint(tmp_path / "m.bin", spec, seed=10)
    out = ok(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "hf"))
    assert "dropped the 47 padded vocab rows of wte (all zero" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (50256, 50256, True)
    assert (config["attention_bias"], config["mlp_bias"]) == (True, True)
    assert "lm_head.weight" not in SafeTensors(tmp_path / "hf" / "model.safetensors").entries


@pytest.mark.parametrize("version", [3, 5])
@pytest.mark.parametrize("name", list(LLAMA_SPECS))
def test_export_then_import_is_byte_identical(tmp_path, name, version):
    spec = llama_spec(name)
    random_checkpoint(tmp_path / f"{name}.bin", spec, seed=11, version=version)
    ok(llmgen("export-hf", tmp_path / f"{name}.bin", "-o", tmp_path / "hf"))
    dtype = ["--dtype", "bf16"] if version == 5 else []
    ok(llmgen("import-hf", tmp_path / "hf", "-o", tmp_path / "hf" / f"{name}.bin", *dtype))
    assert (tmp_path / "hf" / f"{name}.bin").read_bytes() == (tmp_path / f"{name}.bin").read_bytes()


def test_export_notes_padded_rows_that_are_not_zero(tmp_path):
    spec = llama_spec("mha-padding")
    write_model(tmp_path / "m.bin", spec, ref.init_params(spec, seed=12))
    out = ok(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "hf"))
    assert "dropped the 156 padded vocab rows of wte and lm_head (not zero in wte and lm_head: importing back " \
           "gives zeros there" in out


@pytest.mark.parametrize("blocks, keys", [
    ({"norm": "rmsnorm"}, "(this model has norm rmsnorm), LlamaForCausalLM has norm rmsnorm, position rope and mlp "
                          "swiglu (this model has position learned, mlp gelu)"),
    ({"norm": "rmsnorm", "position": "rope", "mlp": "relu2"}, "(this model has mlp relu2)"),
])
def test_export_refuses_blocks_no_architecture_holds(tmp_path, blocks, keys):
    spec = specs.from_dict({"layers": 1, "heads": 2, "channels": 16, "vocab_size": 64, "max_seq_len": 8, **blocks}, "x")
    assert hf_family(spec) is None
    write_model(tmp_path / "m.bin", spec, ref.init_params(spec))
    refused(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "hf"),
            "m.bin: no Hugging Face architecture llmgen writes holds these blocks", keys)
    assert not (tmp_path / "hf").exists()


# ---- GPT-2 with an untied lm_head ----------------------------------------------------------
def test_gpt2_with_untied_lm_head(tmp_path):
    """GPT2LMHeadModel with tie_word_embeddings false is GPT-2's blocks plus tie_embeddings =
    false; the tensor list has no Hugging Face names for that spec yet, so it is refused, in one
    line (when it gains them, the import must compute transformers' forward)."""
    from test_interop import gpt2_config_json, hf_forward, random_hf_tensors, NH as GPT2_NH, V as GPT2_V
    t = random_hf_tensors(seed=13)
    head = np.random.default_rng(14).normal(0, 0.3, t["wte.weight"].shape).astype(np.float32)
    d = tmp_path / "hf"
    d.mkdir()
    tensors = {"transformer." + k: v for k, v in t.items()} | {"lm_head.weight": head}
    (d / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    (d / "config.json").write_text(json.dumps(gpt2_config_json(tie_word_embeddings=False)))
    result = llmgen("import-hf", d, "-o", tmp_path / "m.bin")
    untied = specs.from_dict({"layers": 2, "heads": GPT2_NH, "channels": 48, "vocab_size": GPT2_V, "max_seq_len": 16,
                              "tie_embeddings": False}, "untied")
    if not all(p.hf for p in parameters(untied)):
        refused(result, "config.json: tie_word_embeddings is false: a GPT-2 with an untied lm_head cannot be "
                "imported yet")
        return
    ok(result)
    spec, params = read_model(tmp_path / "m.bin")
    assert spec == untied and np.array_equal(params["lm_head"][:GPT2_V], head)
    tokens = random_tokens(32, GPT2_V, seed=15).reshape(2, 16)
    # hf_forward classifies with wte: recover the final hidden states, then classify with lm_head
    wte = t["wte.weight"].astype(np.float64)
    hidden = np.linalg.lstsq(wte, hf_forward(t, tokens, GPT2_NH).reshape(-1, GPT2_V).T, rcond=None)[0].T
    theirs = (hidden @ head.astype(np.float64).T).reshape(2, 16, GPT2_V)
    assert rel_error(ref_logits(spec, params, tokens)[..., :GPT2_V], theirs) < 1e-10


def test_untied_gpt2_exports_and_imports_back_byte_identical(tmp_path):
    spec = specs.from_dict({"layers": 2, "heads": 2, "channels": 16, "vocab_size": 64, "max_seq_len": 8,
                            "tie_embeddings": False}, "x")
    assert hf_family(spec) == "gpt2"
    params = ref.init_params(spec, seed=3)
    params["wte"][64:] = params["lm_head"][64:] = 0.0  # the padded rows (export drops them)
    write_model(tmp_path / "m.bin", spec, params)
    ok(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["architectures"] == ["GPT2LMHeadModel"]
    ok(llmgen("import-hf", tmp_path / "hf", "-o", tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()


# ---- bad input ---------------------------------------------------------------------------
def imp(d, out, *args):
    return llmgen("import-hf", d, "-o", out, *args)


@pytest.mark.parametrize("overrides, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling with rope_type 'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling with rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters with rope_type 'llama3'"),
    ({"sliding_window": 16}, "sliding_window 16"),
    ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window true"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
     "rope_parameters.partial_rotary_factor 0.25"),
    ({"qk_norm": True}, "qk_norm true"),
    ({"head_dim": 16}, "head_dim 16 (llmgen's head size is hidden_size / num_attention_heads = 48/6 = 8)"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias true with mlp_bias false"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "llmgen reads LlamaForCausalLM"),
    ({"hidden_size": DROP}, "hidden_size missing"),
    ({"num_key_value_heads": 4}, "num_key_value_heads (spec field 'kv_heads'): 4 does not divide heads 6"),
    ({"vocab_size": 70000}, "tokens are stored as uint16"),
    ({"num_attention_heads": 0}, "num_attention_heads (spec field 'heads'): must be positive, got 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads (spec field 'kv_heads'): must be positive"),
    ({"num_hidden_layers": 3}, "missing tensor model.layers.2.input_layernorm.weight"),
    ({"intermediate_size": 40}, "tensor model.layers.0.mlp.gate_proj.weight has shape [37, 48], expected [40, 48]"),
    ({"tie_word_embeddings": False}, "missing tensor lm_head.weight (the output layer: tie_word_embeddings is false"),
])
def test_config_the_trainer_cannot_compute_is_refused(tmp_path, overrides, message):
    t = llama_tensors(llama_config(), seed=16)
    d = save_llama(tmp_path / "hf", t, llama_config(**overrides))
    refused(imp(d, tmp_path / "out.bin"), message)
    assert not (tmp_path / "out.bin").exists()


def test_all_problems_of_a_config_in_one_line(tmp_path):
    d = save_llama(tmp_path / "hf", llama_tensors(llama_config()), llama_config(hidden_act="relu", sliding_window=8))
    refused(imp(d, tmp_path / "out.bin"), "a Llama variant llmgen's trainer does not compute: hidden_act 'relu'",
            "; sliding_window 8")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}),
     "unexpected tensor model.layers.0.self_attn.q_norm.weight (a norm on q or k, which the trainer does not compute)"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.bias": np.ones(H, np.float32)}),
     "unexpected tensor model.layers.1.mlp.up_proj.bias (mlp_bias is false in"),
    (lambda t: t.update({"model.layers.2.input_layernorm.weight": np.ones(C, np.float32)}),
     "unexpected tensor model.layers.2.input_layernorm.weight (num_hidden_layers is 2 in"),
    (lambda t: t.update({"score.weight": np.ones((2, C), np.float32)}),
     "unexpected tensor score.weight (not part of LlamaForCausalLM's layout"),
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"), "missing tensor model.layers.1.self_attn.k_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.ones((C, C), np.float32)}),
     "tensor model.layers.0.self_attn.k_proj.weight has shape [48, 48], expected [16, 48]"),
    (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}),
     "lm_head.weight differs from model.embed_tokens.weight, but"),
])
def test_tensors_that_do_not_fit_are_refused(tmp_path, change, message):
    config = llama_config()
    t = llama_tensors(config, seed=17)
    change(t)
    refused(imp(save_llama(tmp_path / "hf", t, config), tmp_path / "out.bin"), message)


def test_old_inv_freq_buffers_are_skipped(tmp_path):
    config = llama_config()
    t = llama_tensors(config, seed=18)
    inv = {f"model.layers.{n}.self_attn.rotary_emb.inv_freq": 1 / 500.0 ** (np.arange(0, 8, 2) / 8) for n in range(L)}
    check_import(tmp_path, t | {k: v.astype(np.float32) for k, v in inv.items()}, config)


def test_sharded_files_that_do_not_fit_are_refused(tmp_path):
    config = llama_config()
    t = llama_tensors(config, seed=19)
    out = tmp_path / "out.bin"

    def sharded(name):
        return save_llama(tmp_path / name, t, config, shards=3)

    def index(d):
        return json.loads((d / "model.safetensors.index.json").read_text())

    def write_index(d, data):
        (d / "model.safetensors.index.json").write_text(json.dumps(data))

    d = sharded("missing-shard")
    (d / "model-00002-of-00003.safetensors").unlink()
    refused(imp(d, out), "model.safetensors.index.json: weight_map names the shard model-00002-of-00003.safetensors, "
            "which is not in")
    d = sharded("unlisted-shard")
    data = index(d)
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != "model-00003-of-00003.safetensors"}
    write_index(d, data)
    refused(imp(d, out), "weight_map lists 2 of 3 shards: missing model-00003-of-00003.safetensors")
    d = sharded("elsewhere")
    data = index(d)
    data["weight_map"]["model.norm.weight"] = "other.safetensors"
    write_index(d, data)
    refused(imp(d, out), "weight_map names the shard other.safetensors, which is not in")
    d = sharded("twice")
    first = (d / "model-00001-of-00003.safetensors")
    names1 = list(t)[0::3]
    extra = list(t)[1]  # a tensor of shard 2, written into shard 1 as well
    first.write_bytes(safetensors_bytes({k: t[k] for k in [*names1, extra]}))
    refused(imp(d, out), f"tensor {extra} is in two shards, model-00001-of-00003.safetensors and "
            "model-00002-of-00003.safetensors")
    d = sharded("wrong-place")
    data = index(d)
    data["weight_map"][list(t)[0]] = "model-00002-of-00003.safetensors"
    write_index(d, data)
    refused(imp(d, out), f"weight_map puts tensor {list(t)[0]} in model-00002-of-00003.safetensors, but it is in "
            "model-00001-of-00003.safetensors")
    d = sharded("not-held")
    data = index(d)
    data["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    write_index(d, data)
    refused(imp(d, out), "weight_map puts tensor model.layers.9.mlp.up_proj.weight in model-00001-of-00003"
            ".safetensors, which does not hold it")
    d = sharded("dup-key")
    text = (d / "model.safetensors.index.json").read_text()
    text = text.replace('"weight_map": {', '"weight_map": {"model.norm.weight": "model-00001-of-00003.safetensors", ', 1)
    (d / "model.safetensors.index.json").write_text(text)
    refused(imp(d, out), "model.safetensors.index.json: 'model.norm.weight' is there twice")
    d = sharded("path")
    data = index(d)
    data["weight_map"][list(t)[0]] = "../model-00001-of-00003.safetensors"
    write_index(d, data)
    refused(imp(d, out), "weight_map names the shard '../model-00001-of-00003.safetensors', not a file name in this dir")
    for bad, message in ((["x"], "not a safetensors index (a JSON object)"),
                         ({"metadata": {}}, "weight_map must be an object of tensor name -> shard file, got None"),
                         ({"weight_map": {"a": 5}}, "weight_map: tensor 'a' must name a shard file, got 5"),
                         ({"weight_map": {}}, "weight_map lists no tensors")):
        write_index(d, bad)
        refused(imp(d, out), message)
    (d / "model.safetensors.index.json").write_text("{")
    refused(imp(d, out), "model.safetensors.index.json: not valid JSON")
    d = sharded("no-index")
    (d / "model.safetensors.index.json").unlink()
    refused(imp(d, out), "no model.safetensors in this dir, nor a model.safetensors.index.json (found "
            "model-00001-of-00003.safetensors")
    assert not out.exists()


def test_llama_tensors_without_config_are_refused(tmp_path):
    d = save_llama(tmp_path / "hf", llama_tensors(llama_config()), None)
    refused(imp(d, tmp_path / "out.bin"), "holds a Llama's tensors (model.embed_tokens.weight) but there is no "
            "config.json beside it")


def test_max_seq_len_is_for_rotary_models(tmp_path):
    from test_interop import valid_hf_dir
    refused(imp(valid_hf_dir(tmp_path / "gpt2"), tmp_path / "out.bin", "--max-seq-len", 8),
            "--max-seq-len caps a rotary (Llama) model's context")


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "48"), ("num_attention_heads", 6.0), ("num_key_value_heads", "2"), ("head_dim", True),
    ("intermediate_size", None), ("num_hidden_layers", [2]), ("vocab_size", 97.5), ("max_position_embeddings", "32"),
    ("rms_norm_eps", "1e-5"), ("rope_theta", True), ("rope_scaling", "linear"), ("rope_parameters", [1]),
    ("tie_word_embeddings", "true"), ("attention_bias", 0), ("mlp_bias", None), ("hidden_act", ["silu"]),
    ("attention_dropout", "0"), ("pretraining_tp", 1.5), ("partial_rotary_factor", "1"), ("sliding_window", 4.5),
    ("use_sliding_window", "no"), ("qk_norm", 1), ("architectures", "LlamaForCausalLM"),
    ("llmgen_padded_vocab_size", "128"),
])
def test_config_values_of_the_wrong_type_are_refused(tmp_path, key, value):
    d = save_llama(tmp_path / "hf", llama_tensors(llama_config()), llama_config(**{key: value}))
    refused(imp(d, tmp_path / "out.bin"), f"{d / 'config.json'}: {key} must be")


def test_rope_settings_of_the_wrong_type_are_refused(tmp_path):
    d = save_llama(tmp_path / "hf", llama_tensors(llama_config()),
                   llama_config(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}))
    refused(imp(d, tmp_path / "out.bin"), "config.json: rope_parameters.rope_theta must be a number, got '1e4'")


# ---- transformers itself -------------------------------------------------------------------
def transformers_or_skip():
    torch = pytest.importorskip("torch", reason="torch is not installed: no comparison with transformers' "
                                "LlamaForCausalLM (the NumPy forward above stands in for it)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: no comparison with "
                                       "its LlamaForCausalLM")
    return torch, transformers


def their_logits(torch, model, tokens):
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens)).logits.double().numpy()


@pytest.mark.parametrize("tied, bias", [(True, False), (False, False), (False, True)])
def test_transformers_round_trip(tmp_path, tied, bias):
    """A random LlamaForCausalLM made and saved by transformers imports to a checkpoint whose
    reference logits are transformers' (float32 tolerance); its export loads back in transformers."""
    torch, transformers = transformers_or_skip()
    torch.manual_seed(20)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=H, num_hidden_layers=L,
                                      num_attention_heads=NH, num_key_value_heads=KVH, max_position_embeddings=MAXT,
                                      tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
                                      rms_norm_eps=1e-5, rope_theta=500.0, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # the norms away from one, biases away from zero
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    out = ok(llmgen("import-hf", tmp_path / "hf", "-o", tmp_path / "m.bin"))
    spec, params = read_model(tmp_path / "m.bin")
    assert (spec.tie_embeddings, spec.bias, spec.kv_head_count, spec.rope_theta) == (tied, bias, KVH, 500.0), out
    tokens = random_tokens(2 * MAXT, V, seed=21).reshape(2, MAXT)
    theirs = their_logits(torch, model, tokens)
    ours = ref_logits(spec, params, tokens)[..., :V]
    print(f"max |logit difference| tied={tied} bias={bias}: {np.abs(ours - theirs).max():.3g} "
          f"(logits up to {np.abs(theirs).max():.3g})")
    assert rel_error(ours, theirs) < 1e-5
    # and back: export-hf's files load in transformers with every tensor used, and compute the same
    ok(llmgen("export-hf", tmp_path / "m.bin", "-o", tmp_path / "out"))
    again, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert again.config.tie_word_embeddings == tied and again.config.rms_norm_eps == 1e-5
    assert rel_error(their_logits(torch, again, tokens), theirs) < 1e-6
