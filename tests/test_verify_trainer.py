"""llmgen verify --trainer: an edited copy of the emitted train_gpt2.c, compared op by op.

For each layer kind, a deliberately broken copy (a sign flipped, a term dropped, an index off
by one) must fail and name that layer and direction as the first divergence; an unedited
copy passes. The copies build with -O1 (a second to compile) instead of the Makefile's -Ofast.
"""

import re

import pytest

from llmgen import spec as specs
from llmgen.emit import emit
from llmgen.verify import first_divergence, verify

from conftest import llmgen

CFLAGS = "-O1 -march=native"
GPT2 = specs.load("test-tiny")  # 2 layers: the backward meets layer 1 first
VARIANT = GPT2.with_overrides(heads=4, norm="rmsnorm", position="rope", mlp="swiglu", kv_heads=2, tie_embeddings=False)
RELU2 = GPT2.with_overrides(mlp="relu2")

# (what breaks, spec, function, old text, new text, the first divergence's start)
BREAKS = [
    ("encoder forward: position off by one", GPT2, "encoder_forward",
     "(size_t)(bt % T) * C", "(size_t)(bt % T + 1) * C", "forward, encoder (encoded"),
    ("encoder backward: dwpe's sign", GPT2, "encoder_backward",
     "dwpe_row[i] += dout_row[i];", "dwpe_row[i] -= dout_row[i];", "backward, encoder (dwpe"),
    ("layernorm forward: variance over C - 1", GPT2, "layernorm_forward",
     "v = v / C;", "v = v / (C - 1);", "forward, layer 0, layernorm 1 (ln1"),
    ("layernorm backward: a sign in dinp", GPT2, "layernorm_backward",
     "- norm * g_norm_mean", "+ norm * g_norm_mean", "backward, final layernorm (dresidual3 of layer 1"),
    ("layernorm backward: dbias's term dropped", GPT2, "layernorm_backward",
     "db[i - i0] += dy[i];", "db[i - i0] += 0.0f;", "backward, final layernorm (dlnfb"),
    ("matmul forward: the bias dropped", GPT2, "matmul_forward(",
     "/*b_n=*/IC, bias,", "/*b_n=*/IC, NULL,", "forward, layer 0, qkv (qkv"),
    ("matmul forward_add: the residual dropped", GPT2, "matmul_forward_add",
     "/*accumulate=*/1", "/*accumulate=*/0", "forward, layer 0, attproj + residual (residual2"),
    ("matmul backward: dinp's last column of K dropped", GPT2, "matmul_backward",
     "/*M=*/N, /*N=*/IC, /*K=*/OC,", "/*M=*/N, /*N=*/IC, /*K=*/OC - 1,", "backward, classifier (dlnf"),
    ("matmul backward: dweight's last row dropped", GPT2, "matmul_backward",
     "/*M=*/OC, /*N=*/IC, /*K=*/N,", "/*M=*/OC, /*N=*/IC, /*K=*/N - 1,", "backward, layer 1, fcproj (dfcprojw"),
    ("matmul backward: dbias's sign", GPT2, "matmul_backward",
     "dbias[o] += db[o - o0];", "dbias[o] -= db[o - o0];", "backward, layer 1, fcproj (dfcprojb"),
    ("attention forward: the causal mask off by one", GPT2, "attention_forward",
     "int visible = q0 + r - k0 + 1 < nk ? q0 + r - k0 + 1 : nk;",
     "int visible = q0 + r - k0 + 2 < nk ? q0 + r - k0 + 2 : nk;", "forward, layer 0, attention (atty"),
    ("attention backward: delta's sign", GPT2, "attention_backward_keys",
     "(dp_row[j] - delta[q0 + r])", "(dp_row[j] + delta[q0 + r])", "backward, layer 1, attention (dqkv"),
    ("gelu forward: tanh's sign", GPT2, "gelu_forward",
     "(1.0f + tanhf(u))", "(1.0f - tanhf(u))", "forward, layer 0, gelu (fch_gelu"),
    ("gelu backward: the sech^2 term dropped", GPT2, "gelu_backward",
     " + 0.5f * x * (1.0f - th * th) * du", "", "backward, layer 1, gelu (dfch"),
    ("residual forward: the copy one short", GPT2, "residual_forward",
     "memcpy(out, inp1, N * sizeof(float));", "memcpy(out, inp1, (N - 1) * sizeof(float));",
     "forward, layer 0, attproj + residual (residual2"),
    ("residual backward: the copy one short", GPT2, "residual_backward",
     "memcpy(dinp1, dout, N * sizeof(float));", "memcpy(dinp1, dout, (N - 1) * sizeof(float));",
     "backward, layer 1, layernorm 2 + residual (dresidual2"),
    ("cross-entropy forward: the maximum's sign", GPT2, "crossentropy_forward",
     "logf(sum) + maxval - z[targets[n]]", "logf(sum) - maxval - z[targets[n]]", "forward, loss (losses"),
    ("cross-entropy backward: the target's sign", GPT2, "crossentropy_softmax_backward",
     "z[target] -= dloss;", "z[target] += dloss;", "backward, classifier (dlnf"),
    ("AdamW: the second moment's correction a step ahead", GPT2, "gpt2_update",
     "powf(beta2, t)", "powf(beta2, t + 1)", "optimizer, 2 AdamW steps (losses"),
    ("rmsnorm forward: the mean over C + 1", VARIANT, "rmsnorm_forward",
     "sqrtf(ss / C + ", "sqrtf(ss / (C + 1) + ", "forward, layer 0, rmsnorm 1 (ln1"),
    ("rmsnorm backward: a sign in dinp", VARIANT, "rmsnorm_backward",
     "- norm * g_norm_mean", "+ norm * g_norm_mean", "backward, final rmsnorm (dresidual3 of layer 1"),
    ("rope forward: rotated back", VARIANT, "rope_forward",
     "rope_rotate(qkv, B, T, 1);", "rope_rotate(qkv, B, T, -1);", "forward, layer 0, qkv + rope (qkv"),
    ("rope backward: rotated forward", VARIANT, "rope_backward",
     "rope_rotate(dqkv, B, T, -1);", "rope_rotate(dqkv, B, T, 1);", "backward, layer 1, attention + rope (dqkv"),
    ("grouped-query attention: the key/value head off by one", VARIANT, "attention_forward",
     "const int g = h / ATT_GROUP;", "const int g = h % KV_HEADS;",
     "forward, layer 0, attention (atty"),
    ("swiglu forward: silu's sign", VARIANT, "swiglu_forward",
     "(1.0f + expf(-gate[i]))", "(1.0f + expf(gate[i]))", "forward, layer 0, swiglu (fch_swiglu"),
    ("swiglu backward: dup's term dropped", VARIANT, "swiglu_backward",
     "dup[i] = dy[i] * gate[i] * s;", "dup[i] = dy[i] * s;", "backward, layer 1, swiglu (dfch"),
    ("untied classifier: dlm_head's sign", VARIANT, "classifier_backward",
     "matmul_backward(dlnf + n0 * CHANNELS, dwte, NULL, logits,",
     "for (size_t i = 0; i < (size_t)n * PADDED_VOCAB_SIZE; i++) { logits[i] = -logits[i]; }\n"
     "        matmul_backward(dlnf + n0 * CHANNELS, dwte, NULL, logits,", "backward, classifier (dlnf"),
    ("relu2 forward: the square dropped", RELU2, "relu2_forward",
     "out[i] = r * r;", "out[i] = r;", "forward, layer 0, relu2 (fch_relu2"),
    ("relu2 backward: the factor 2 dropped", RELU2, "relu2_backward",
     "dout[i] * 2.0f * ", "dout[i] * ", "backward, layer 1, relu2 (dfch"),
]


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    """The emitted train_gpt2.c of each spec the breaks use."""
    out = {}
    for spec in (GPT2, VARIANT, RELU2):
        d = tmp_path_factory.mktemp("emitted")
        emit(spec, d)
        out[spec.name] = (d / "train_gpt2.c").read_text()
    return out


def break_in(text: str, function: str, old: str, new: str) -> str:
    """text with the first `old` inside `function` (from its definition on) replaced."""
    start = text.index(f"static void {function}" if function.endswith("(") else f"static void {function}(")
    end = text.index("\n}\n", start)
    at = text.index(old, start)
    assert at < end, f"{old!r} is not in {function}"
    return text[:at] + new + text[at + len(old):]


@pytest.mark.parametrize("what, spec, function, old, new, expected", BREAKS, ids=[b[0] for b in BREAKS])
def test_a_broken_copy_names_its_layer_and_direction(tmp_path, emitted, what, spec, function, old, new, expected):
    trainer = tmp_path / "train_gpt2.c"
    trainer.write_text(break_in(emitted[spec.name], function, old, new))
    rows = verify(spec, B=2, T=16, steps=2, build_dir=tmp_path / "build", trainer=trainer, cflags=CFLAGS)
    divergence = first_divergence(rows)
    assert divergence is not None, f"{what}: every row within tolerance"
    assert divergence.startswith(f"first divergence: {expected}"), divergence
    assert divergence.endswith("everything before it matches") or "it is the first comparison" in divergence
    first = next(i for i, r in enumerate(rows) if not r.ok)
    assert all(r.ok for r in rows[:first])


@pytest.mark.parametrize("spec", [GPT2, VARIANT, RELU2], ids=lambda s: s.name)
def test_an_unedited_copy_passes(tmp_path, emitted, spec):
    trainer = tmp_path / "train_gpt2.c"
    trainer.write_text(emitted[spec.name])
    rows = verify(spec, B=2, T=16, steps=2, build_dir=tmp_path / "build", trainer=trainer, cflags=CFLAGS)
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert first_divergence(rows) is None


def test_the_command_reads_the_spec_from_the_header_and_points_at_the_edit(tmp_path, emitted):
    """The README's example: one line of the layernorm backward changed."""
    trainer = tmp_path / "train_gpt2.c"
    trainer.write_text(break_in(emitted[GPT2.name], "layernorm_backward", "- norm * g_norm_mean", "+ norm * g_norm_mean"))
    result = llmgen("verify", "--trainer", trainer, "--steps", 2, "--cflags", CFLAGS, "--build-dir", tmp_path / "b")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"verify {GPT2.name} (B=2, T=16): {trainer}, C (float32), against the NumPy reference (float64)"
    assert lines[-1].startswith("first divergence: backward, final layernorm (dresidual3 of layer 1 max rel err ")
    assert re.match(r"\d+ of \d+ outside tolerance$", lines[-2])
    # the forward is untouched: every forward row is ok
    assert all(line.endswith("ok") for line in lines if line.startswith("forward"))


def test_an_edit_that_does_not_compile_gets_the_compilers_first_error(tmp_path, emitted):
    text = emitted[GPT2.name]
    trainer = tmp_path / "mine.c"
    trainer.write_text(text.replace("float g_mean = 0.0f, g_norm_mean = 0.0f;", "float g_mean = 0.0f, g_norm_mean = 0.0f", 1))
    line = text[:text.index("float g_mean = 0.0f, g_norm_mean = 0.0f;")].count("\n") + 2  # the statement after it
    result = llmgen("verify", "--trainer", trainer, "--cflags", CFLAGS, "--build-dir", tmp_path / "b")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {trainer} does not compile with the test harness: {trainer}:{line}:")
    assert "error: expected" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_edit_that_removes_what_the_harness_calls_is_named(tmp_path, emitted):
    trainer = tmp_path / "mine.c"
    trainer.write_text(emitted[GPT2.name].replace("static void gpt2_get_gradients(", "static void gpt2_gradients(", 1))
    result = llmgen("verify", "--trainer", trainer, "--cflags", CFLAGS, "--build-dir", tmp_path / "b")
    assert result.returncode == 1
    assert "the test harness calls gpt2_get_gradients, which" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sizes_that_differ_from_the_header_are_refused(tmp_path, emitted):
    text = emitted[GPT2.name]
    trainer = tmp_path / "mine.c"
    trainer.write_text(text.replace("#define CHANNELS 32 ", "#define CHANNELS 48 ", 1))
    line = text[:text.index("#define CHANNELS 32 ")].count("\n") + 1
    result = llmgen("verify", "--trainer", trainer, "--build-dir", tmp_path / "b")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {trainer}:{line}: #define CHANNELS 48, but the spec in its header gives 32: "
                                     "to change the sizes, change the spec and emit again")


def test_spec_given_must_agree_with_the_header(tmp_path, emitted):
    trainer = tmp_path / "train_gpt2.c"
    trainer.write_text(emitted[GPT2.name])
    result = llmgen("verify", "--trainer", trainer, "--spec", "test-odd", "--build-dir", tmp_path / "b")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {trainer}: the spec in its header differs from --spec (")
    assert "channels 32 vs 48" in result.stderr
    result = llmgen("verify", "--trainer", trainer, "--layers", "3", "--build-dir", tmp_path / "b")
    assert result.returncode == 1 and "differs from --spec (layers 2 vs 3" in result.stderr
    # the same spec, given: fine (a copy without its header block needs it)
    bare = tmp_path / "bare.c"
    bare.write_text(emitted[GPT2.name].replace("// The spec it was generated from", "// The spec was", 1))
    result = llmgen("verify", "--trainer", bare, "--build-dir", tmp_path / "b")
    assert result.returncode == 1 and "no spec in its header" in result.stderr and "--spec" in result.stderr
    result = llmgen("verify", "--trainer", bare, "--spec", "test-tiny", "--steps", 2, "--cflags", CFLAGS,
                    "--build-dir", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("within tolerance")


@pytest.mark.parametrize("name, content, message", [
    ("missing.c", None, "no such trainer"),
    ("notes.txt", "hello", "expected a train_gpt2.c (C) or train_gpt2.cu (CUDA) file, by its suffix"),
    ("binary.c", b"\xff\xfe\x00garbage", "not a C or CUDA source file (not UTF-8 text"),
])
def test_bad_trainer_files(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = llmgen("verify", "--trainer", path, "--build-dir", tmp_path / "b")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {path}") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_cuda_trainer_needs_a_gpu(tmp_path):
    """Without a GPU the command says so and stops (with one, it is compared like the C)."""
    from llmgen.verify import cuda_device_problem
    if cuda_device_problem() is None:
        pytest.skip("a GPU is here: tests/test_cuda_verify.py runs the comparison")
    out = tmp_path / "cu"
    result = llmgen("emit", "--spec", "test-tiny", "--target", "cuda", "--precision", "bf16", "-o", out)
    assert result.returncode == 0, result.stderr
    result = llmgen("verify", "--trainer", out / "train_gpt2.cu", "--build-dir", tmp_path / "b")
    assert result.returncode == 1
    assert result.stderr.startswith("error: no CUDA device: ") and "needs a GPU" in result.stderr
    result = llmgen("verify", "--trainer", out / "train_gpt2.cu", "--precision", "fp32")
    assert result.returncode == 1 and "its header says precision bf16, but --precision fp32" in result.stderr
    result = llmgen("verify", "--trainer", out / "train_gpt2.cu", "--target", "c")
    assert result.returncode == 1 and "a CUDA trainer (by its suffix), but --target c" in result.stderr


def test_train_runs_an_edited_trainer(tmp_path):
    """llmgen train --trainer: the edited copy is what gets built and trained."""
    out = tmp_path / "emitted"
    assert llmgen("emit", "--spec", "gpt2-tiny", "-o", out).returncode == 0
    text = (out / "train_gpt2.c").read_text()
    mine = tmp_path / "mine.c"
    mine.write_text(text.replace("(g - g_mean - norm * g_norm_mean)", "(g - norm * g_norm_mean)", 1))
    result = llmgen("train", "--trainer", mine, "--steps", 3, "--val-every", 3, "--sample-tokens", 0,
                    "-b", 2, "-t", 16, "-o", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert f"[1/3] trainer: {mine} (edited, for gpt2-tiny), built in {tmp_path / 'run' / 'trainer'}" in result.stdout
    assert (tmp_path / "run" / "trainer" / "train_gpt2.c").read_text() == mine.read_text()
    assert (tmp_path / "run" / "run" / "model_00000003.bin").is_file()
    # refused: a CUDA file, a spec that differs, an edit that does not compile
    result = llmgen("train", "--trainer", tmp_path / "x.cu", "-o", tmp_path / "run")
    assert result.returncode == 1 and "llmgen train runs the C trainer" in result.stderr
    result = llmgen("train", "--trainer", mine, "--layers", 2, "-o", tmp_path / "run")
    assert result.returncode == 1 and "differs from --spec (layers 4 vs 2" in result.stderr
    mine.write_text(text.replace("static void gelu_forward(", "static void gelu_forward(int oops,", 1))
    result = llmgen("train", "--trainer", mine, "--steps", 3, "-o", tmp_path / "run")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {mine} does not compile: {mine}:")
