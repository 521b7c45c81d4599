"""Tests of the NumPy GPT-2 reference: forward against a loop-by-loop version, every gradient
against central finite differences in float64, the lr schedule, AdamW and train_step."""

import math

import numpy as np
import pytest

from llmgen import reference as ref
from llmgen import spec as specmod
from llmgen.tensors import activations, param_shapes, parameters, sizes

# The test-tiny and test-odd presets (spec/*.toml), built inline so the tests do not depend on
# how the presets are packaged.  test-odd has 3 heads and V=97 < Vp=128, so padding is exercised.
TINY = specmod.from_dict({"name": "test-tiny", "layers": 2, "heads": 2, "channels": 32,
                          "vocab_size": 64, "padded_vocab_size": 64, "max_seq_len": 32}, "test")
ODD = specmod.from_dict({"name": "test-odd", "layers": 2, "heads": 3, "channels": 48,
                         "vocab_size": 97, "padded_vocab_size": 128, "max_seq_len": 24}, "test")


def random_params(spec, seed, dtype=np.float64):
    """Params far from the GPT-2 init (no ones/zeros, O(1) activations, GELU in its curved
    part) so that every term of every gradient matters."""
    rng = np.random.default_rng(seed)
    params = {}
    for t in parameters(spec):
        shape = param_shapes(spec)[t.name]
        if t.init == "ones":
            x = 1.0 + 0.3 * rng.standard_normal(shape)
        elif t.init == "zeros":
            x = 0.2 * rng.standard_normal(shape)
        elif t.name in ("wte", "wpe"):
            x = 0.5 * rng.standard_normal(shape)
        else:  # (.., OC, IC) matrices
            x = rng.standard_normal(shape) / math.sqrt(shape[-1])
        params[t.name] = x.astype(dtype)
    return params


def random_batch(spec, B, T, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, spec.vocab_size, size=(B, T))
    targets = rng.integers(0, spec.vocab_size, size=(B, T))
    return tokens, targets


# ---- an independent, loop-by-loop forward (slow, only for tiny sizes) -----------------------
def naive_forward(spec, p, tokens, targets):
    B, T = tokens.shape
    C, NH, L, V = spec.n_embd, spec.n_head, spec.n_layer, spec.vocab_size
    HS = C // NH

    def ln(x, w, b):
        out = np.empty_like(x)
        for bb in range(B):
            for tt in range(T):
                row = x[bb, tt]
                mu = sum(row) / C
                var = sum((r - mu) ** 2 for r in row) / C
                out[bb, tt] = (row - mu) / math.sqrt(var + 1e-5) * w + b
        return out

    def lin(x, w, b):
        return np.einsum("btj,ij->bti", x, w) + (0 if b is None else b)

    def gelu(x):
        return np.vectorize(lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3))))(x)

    x = np.stack([np.stack([p["wte"][tokens[b, t]] + p["wpe"][t] for t in range(T)]) for b in range(B)])
    for l in range(L):
        h = ln(x, p["ln1w"][l], p["ln1b"][l])
        qkv = lin(h, p["qkvw"][l], p["qkvb"][l])
        y = np.zeros((B, T, C))
        for b in range(B):
            for hh in range(NH):
                sl = slice(hh * HS, (hh + 1) * HS)
                for t in range(T):
                    q = qkv[b, t, :C][sl]
                    scores = [float(q @ qkv[b, t2, C:2 * C][sl]) / math.sqrt(HS) for t2 in range(t + 1)]
                    mx = max(scores)
                    w = [math.exp(s - mx) for s in scores]
                    tot = sum(w)
                    for t2 in range(t + 1):
                        y[b, t, sl] += w[t2] / tot * qkv[b, t2, 2 * C:][sl]
        x = x + lin(y, p["attprojw"][l], p["attprojb"][l])
        h = ln(x, p["ln2w"][l], p["ln2b"][l])
        x = x + lin(gelu(lin(h, p["fcw"][l], p["fcb"][l])), p["fcprojw"][l], p["fcprojb"][l])
    logits = lin(ln(x, p["lnfw"], p["lnfb"]), p["wte"], None)
    loss = 0.0
    for b in range(B):
        for t in range(T):
            row = logits[b, t, :V]
            lse = math.log(sum(math.exp(z - row.max()) for z in row)) + row.max()
            loss += lse - row[targets[b, t]]
    return logits, loss / (B * T)


@pytest.mark.parametrize("spec", [TINY, ODD], ids=["tiny", "odd"])
def test_forward_matches_naive_loops(spec):
    p = random_params(spec, seed=1)
    tokens, targets = random_batch(spec, B=2, T=6, seed=2)
    logits, loss, _ = ref.forward(spec, p, tokens, targets)
    want_logits, want_loss = naive_forward(spec, p, tokens, targets)
    assert logits.shape == (2, 6, spec.padded_vocab_size)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-10, atol=1e-10)
    assert loss == pytest.approx(want_loss, rel=1e-12)


@pytest.mark.parametrize("spec", [TINY, ODD], ids=["tiny", "odd"])
def test_cache_has_every_activation_with_its_shape(spec):
    B, T = 3, 5
    p = ref.init_params(spec, seed=0)
    tokens, targets = random_batch(spec, B, T, seed=0)
    logits, loss, cache = ref.forward(spec, p, tokens, targets)
    dims = dict(spec.dims, B=B, T=T)
    for a in activations(spec):
        assert a.name in cache, a.name
        shape = ("B", "T", "Vp") if a.name == "logits" else a.shape  # the C trainer holds a block of rows
        assert cache[a.name].shape == sizes(shape, dims), a.name
        assert cache[a.name].dtype == np.float32, a.name
    assert cache["logits"] is logits
    assert float(cache["losses"].mean()) == pytest.approx(loss, rel=1e-6)
    # causal: future attention weights are exactly zero, and rows of att sum to 1
    upper = np.triu(np.ones((T, T), dtype=bool), k=1)
    assert np.all(cache["att"][..., upper] == 0)
    np.testing.assert_allclose(cache["att"].sum(-1), 1.0, rtol=1e-5)
    # layernorm caches: the output is (x-mean)*rstd*w+b of the input
    x = cache["residual2"][1]
    norm = (x - cache["ln2_mean"][1][..., None]) * cache["ln2_rstd"][1][..., None]
    np.testing.assert_allclose(cache["ln2"][1], norm * p["ln2w"][1] + p["ln2b"][1], rtol=1e-5, atol=1e-6)


def test_probs_sum_to_one_and_padding_is_zero():
    p = ref.init_params(ODD, seed=3)
    tokens, _ = random_batch(ODD, 2, 7, seed=3)
    logits, loss, cache = ref.forward(ODD, p, tokens)  # no targets: no loss, still probs
    assert loss is None and "losses" not in cache
    probs = cache["probs"]
    assert probs.shape == (2, 7, 128)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert np.all(probs[..., ODD.vocab_size:] == 0)
    assert np.all(probs[..., :ODD.vocab_size] > 0)
    # the padded logits are computed (tied wte rows) but take no part in the softmax
    assert np.any(logits[..., ODD.vocab_size:] != 0)


def test_loss_at_init_is_about_ln_vocab():
    tokens, targets = random_batch(ODD, 4, 24, seed=4)
    _, loss, _ = ref.forward(ODD, ref.init_params(ODD, seed=4), tokens, targets)
    assert abs(loss - math.log(ODD.vocab_size)) < 0.05  # ln 97 = 4.57
    assert abs(loss - math.log(ODD.padded_vocab_size)) > 0.2  # not ln 128: padding excluded


def test_init_params_follow_the_tensor_list():
    p32 = ref.init_params(ODD, seed=7)
    p64 = ref.init_params(ODD, seed=7, dtype=np.float64)
    sizes = param_shapes(ODD)
    assert list(p32) == [t.name for t in parameters(ODD)]
    for t in parameters(ODD):
        a = p32[t.name]
        assert a.shape == sizes[t.name] and a.dtype == np.float32
        assert p64[t.name].dtype == np.float64
        np.testing.assert_array_equal(a, p64[t.name].astype(np.float32))
        if t.init == "ones":
            assert np.all(a == 1)
        elif t.init == "zeros":
            assert np.all(a == 0)
        else:
            want = 0.02 if t.init == "normal" else 0.02 / math.sqrt(2 * ODD.n_layer)
            assert float(a.std()) == pytest.approx(want, rel=0.1), t.name
            assert abs(float(a.mean())) < 0.2 * want
    assert not np.array_equal(ref.init_params(ODD, seed=8)["wte"], p32["wte"])


def test_float32_stays_float32_and_agrees_with_float64():
    p64 = random_params(ODD, seed=5)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    tokens, targets = random_batch(ODD, 2, 8, seed=5)
    l32, loss32, c32 = ref.forward(ODD, p32, tokens.astype(np.uint16), targets.astype(np.uint16))
    l64, loss64, c64 = ref.forward(ODD, p64, tokens, targets)
    assert l32.dtype == np.float32
    g32 = ref.backward(ODD, p32, c32)
    g64 = ref.backward(ODD, p64, c64)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in g32:
        assert g32[name].dtype == np.float32, name
        scale = np.abs(g64[name]).max()
        np.testing.assert_allclose(g32[name], g64[name], atol=2e-4 * scale, err_msg=name)


# ---- gradients against finite differences ---------------------------------------------------
def check_gradients(spec, tokens, targets, seed, dloss=1.0, per_tensor=8, eps=1e-5):
    p = random_params(spec, seed)
    _, _, cache = ref.forward(spec, p, tokens, targets)
    grads = ref.backward(spec, p, cache, dloss=dloss)
    rng = np.random.default_rng(seed + 100)
    Vp = spec.padded_vocab_size
    T = tokens.shape[1]
    for name, param in p.items():
        assert grads[name].shape == param.shape and grads[name].dtype == param.dtype
        flat = param.reshape(-1)  # a view: edits go into p[name]
        C = param.shape[-1]
        if name == "wte":  # rows of the batch's tokens and targets, some other, and padded rows
            rows = np.concatenate([tokens.ravel()[:3], targets.ravel()[:3],
                                   rng.integers(0, Vp, size=2), [Vp - 1]])
            picks = rows * C + rng.integers(0, C, size=rows.size)
        elif name == "wpe":  # the positions in use (rows >= T get no gradient at all)
            picks = rng.integers(0, T * C, size=per_tensor)
        else:
            picks = rng.integers(0, flat.size, size=per_tensor)
        for i in picks:
            old = flat[i]
            flat[i] = old + eps
            lp = ref.forward(spec, p, tokens, targets)[1]
            flat[i] = old - eps
            lm = ref.forward(spec, p, tokens, targets)[1]
            flat[i] = old
            fd = dloss * (lp - lm) / (2 * eps)
            an = grads[name].reshape(-1)[i]
            assert abs(fd - an) <= 1e-6 * abs(an) + 1e-9, \
                f"{name}[{np.unravel_index(i, param.shape)}]: backward {an!r}, finite difference {fd!r}"
        # the check must have looked at real gradients, not only zeros
        assert np.abs(grads[name].reshape(-1)[picks]).max() > 1e-4, name
    return grads


def test_gradients_tiny():
    tokens, targets = random_batch(TINY, B=2, T=16, seed=10)
    check_gradients(TINY, tokens, targets, seed=11)


def test_gradients_odd_heads_and_padded_vocab():
    tokens, targets = random_batch(ODD, B=2, T=7, seed=12)
    tokens[1, 3] = ODD.vocab_size + 5  # a padded id as input: its wte row gets embedding grads
    grads = check_gradients(ODD, tokens, targets, seed=13, dloss=0.25)
    V = ODD.vocab_size
    used = np.zeros(ODD.padded_vocab_size, dtype=bool)
    used[tokens.ravel()] = True
    # padded rows get gradient only through the embedding: zero unless used as an input
    assert np.all(grads["wte"][V:][~used[V:]] == 0)
    assert np.any(grads["wte"][V + 5] != 0)
    assert np.all(grads["wpe"][tokens.shape[1]:] == 0)


def test_padded_row_gradient_is_exactly_the_embedding_gradient():
    """wpe[t] and the wte row of the token at (b,t) both get d loss/d encoded[b,t]; with padded
    ids at t=2 in both batch rows, wpe[2]'s gradient must be the sum of those two wte rows'
    gradients: any classifier contribution to a padded row would break the equality."""
    V = ODD.vocab_size
    p = random_params(ODD, seed=14)
    tokens, targets = random_batch(ODD, B=2, T=5, seed=14)
    tokens[0, 2], tokens[1, 2] = V + 1, V + 2
    _, _, cache = ref.forward(ODD, p, tokens, targets)
    grads = ref.backward(ODD, p, cache)
    np.testing.assert_allclose(grads["wpe"][2], grads["wte"][V + 1] + grads["wte"][V + 2],
                               rtol=1e-12, atol=1e-15)
    assert np.abs(grads["wte"][V + 1]).max() > 1e-4
    # and a real token used once at (0,3) gets more than its embedding share: the classifier's
    # dlogits[..., token] * lnf terms
    assert not np.allclose(grads["wte"][tokens[0, 3]], 0)


def test_backward_needs_targets():
    p = ref.init_params(TINY)
    tokens, _ = random_batch(TINY, 1, 4, seed=0)
    _, _, cache = ref.forward(TINY, p, tokens)
    with pytest.raises(ValueError):
        ref.backward(TINY, p, cache)
    with pytest.raises(ValueError):
        ref.forward(ODD, ref.init_params(ODD), tokens, np.full((1, 4), ODD.vocab_size))


def fd_check(f, x, dout, dx, rng, samples, eps=1e-6):
    """dx (the backward's gradient of sum(f() * dout) with respect to x) against central
    differences at `samples` random elements of x, which f reads (x is perturbed in place)."""
    for i in rng.integers(0, x.size, size=samples):
        xf = x.reshape(-1)
        old = xf[i]
        xf[i] = old + eps
        up = (f() * dout).sum()
        xf[i] = old - eps
        down = (f() * dout).sum()
        xf[i] = old
        fd = (up - down) / (2 * eps)
        assert abs(fd - dx.reshape(-1)[i]) <= 1e-6 * abs(fd) + 1e-8


def test_layer_backwards_against_finite_differences():
    """Each layer on its own, with a random upstream gradient."""
    rng = np.random.default_rng(20)

    x = rng.standard_normal((2, 5, 12))
    w, b = 1 + 0.3 * rng.standard_normal(12), rng.standard_normal(12)
    dout = rng.standard_normal((2, 5, 12))
    mean, rstd = ref.layernorm_forward(x, w, b)[1:]
    dx, dw, db = ref.layernorm_backward(dout, x, w, mean, rstd)
    for arr, d in ((x, dx), (w, dw), (b, db)):
        fd_check(lambda: ref.layernorm_forward(x, w, b)[0], arr, dout, d, rng, 10)

    W, bias = rng.standard_normal((7, 12)), rng.standard_normal(7)
    dout = rng.standard_normal((2, 5, 7))
    dx, dW, dbias = ref.matmul_backward(dout, x, W)
    for arr, d in ((x, dx), (W, dW), (bias, dbias)):
        fd_check(lambda: ref.matmul_forward(x, W, bias), arr, dout, d, rng, 10)

    g = 2 * rng.standard_normal((3, 40))
    dout = rng.standard_normal((3, 40))
    fd_check(lambda: ref.gelu_forward(g), g, dout, ref.gelu_backward(dout, g), rng, 10)

    qkv = rng.standard_normal((2, 6, 36))
    dout = rng.standard_normal((2, 6, 12))
    att = ref.attention_forward(qkv, 3)[2]
    fd_check(lambda: ref.attention_forward(qkv, 3)[0], qkv, dout, ref.attention_backward(dout, qkv, att, 3), rng, 10)


# ---- schedule, optimizer, training step -----------------------------------------------------
def test_lr_schedule():
    lr, warmup, steps, frac = 6e-4, 10, 110, 0.1
    assert ref.lr_at(0, steps, lr, warmup, frac) == pytest.approx(lr / warmup)
    assert ref.lr_at(4, steps, lr, warmup, frac) == pytest.approx(lr * 5 / warmup)
    assert ref.lr_at(9, steps, lr, warmup, frac) == pytest.approx(lr)
    assert ref.lr_at(10, steps, lr, warmup, frac) == pytest.approx(lr)
    assert ref.lr_at(60, steps, lr, warmup, frac) == pytest.approx(0.5 * (lr + frac * lr))
    assert ref.lr_at(35, steps, lr, warmup, frac) == pytest.approx(
        frac * lr + 0.5 * (1 + math.cos(math.pi * 0.25)) * (lr - frac * lr))
    assert ref.lr_at(steps, steps, lr, warmup, frac) == pytest.approx(frac * lr)
    assert ref.lr_at(steps - 1, steps, lr, warmup, frac) > frac * lr
    assert ref.lr_at(steps, steps, lr, warmup, 0.0) == pytest.approx(0.0, abs=1e-15)
    # no warmup: the first step already has the full lr; no decay phase: no division by zero
    assert ref.lr_at(0, steps, lr, 0, frac) == pytest.approx(lr)
    assert ref.lr_at(3, 5, lr, 5, frac) == pytest.approx(lr * 4 / 5)
    assert ref.lr_at(5, 5, lr, 5, frac) == pytest.approx(frac * lr)
    vals = [ref.lr_at(s, steps, lr, warmup, frac) for s in range(warmup, steps + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_adamw_single_element_by_hand():
    rng = np.random.default_rng(30)
    p = random_params(TINY, seed=30)
    grads = {k: rng.standard_normal(v.shape) for k, v in p.items()}
    m = {k: 0.1 * rng.standard_normal(v.shape) for k, v in p.items()}
    v = {k: 0.01 * rng.random(v.shape) for k, v in p.items()}
    before = {k: (p[k].copy(), m[k].copy(), v[k].copy()) for k in p}
    t, lr, b1, b2, eps, wd, gs = 3, 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5
    ref.adamw(TINY, p, grads, m, v, t, lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, grad_scale=gs)
    for name, idx, decays in (("wte", (1, 2), True), ("qkvw", (1, 5, 3), True),
                              ("ln1w", (0, 3), False), ("qkvb", (1, 7), False), ("lnfb", (4,), False)):
        p0, m0, v0 = (float(a[idx]) for a in before[name])
        g = float(grads[name][idx]) * gs
        m1 = b1 * m0 + (1 - b1) * g
        v1 = b2 * v0 + (1 - b2) * g * g
        mhat, vhat = m1 / (1 - b1 ** t), v1 / (1 - b2 ** t)
        p1 = p0 - lr * (mhat / (math.sqrt(vhat) + eps) + (wd if decays else 0.0) * p0)
        assert float(m[name][idx]) == pytest.approx(m1, rel=1e-12), name
        assert float(v[name][idx]) == pytest.approx(v1, rel=1e-12), name
        assert float(p[name][idx]) == pytest.approx(p1, rel=1e-12, abs=1e-15), name
    # the decay flags come from the tensor list: 2-D weights decay, biases and norms do not
    assert [t.name for t in parameters(TINY) if t.decay] == ["wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"]


def test_adamw_keeps_float32():
    p = ref.init_params(TINY, seed=1)
    grads = {k: np.ones_like(a) for k, a in p.items()}
    m = {k: np.zeros_like(a) for k, a in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    ref.adamw(TINY, p, grads, m, v, 1, np.float64(1e-3), weight_decay=np.float64(0.1))
    assert all(a.dtype == np.float32 for d in (p, m, v) for a in d.values())
    # first step with m=v=0: the update is lr * g/|g| (+ decay) = -1e-3 on the ln weights
    np.testing.assert_allclose(p["ln1w"], 1 - 1e-3, rtol=1e-6)


def zeros_like(params):
    return {k: np.zeros_like(a) for k, a in params.items()}


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3], ids=["noclip", "clip"])
def test_train_step_micro_batches_equal_one_big_batch(grad_clip):
    spec = ODD
    p0 = random_params(spec, seed=40)
    t1, y1 = random_batch(spec, 2, 8, seed=41)
    t2, y2 = random_batch(spec, 2, 8, seed=42)
    pa, pb = ({k: a.copy() for k, a in p0.items()} for _ in range(2))
    ma, va, mb, vb = zeros_like(p0), zeros_like(p0), zeros_like(p0), zeros_like(p0)
    for step in (1, 2):  # two steps, so the second starts from non-zero m and v
        lr = ref.lr_at(step - 1, 10, 1e-3, 2, 0.1)
        la, na = ref.train_step(spec, pa, ma, va, step, [(t1, y1), (t2, y2)], lr, 0.1, grad_clip)
        lb, nb = ref.train_step(spec, pb, mb, vb, step, [(np.concatenate([t1, t2]), np.concatenate([y1, y2]))],
                                lr, 0.1, grad_clip)
        assert la == pytest.approx(lb, rel=1e-13)
        assert na == pytest.approx(nb, rel=1e-12)
        for k in p0:
            # atol: the k bias has a zero gradient in exact arithmetic (a per-row constant
            # shift of the scores), so Adam turns its rounding noise into ~lr*1e-9 updates
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-11, atol=1e-11, err_msg=k)
            np.testing.assert_allclose(ma[k], mb[k], rtol=1e-10, atol=1e-16, err_msg=k)
    assert not np.array_equal(pa["wte"], p0["wte"])


def test_train_step_clips_and_reports_the_unclipped_norm():
    spec = TINY
    p = random_params(spec, seed=50)
    tokens, targets = random_batch(spec, 2, 8, seed=50)
    m, v = zeros_like(p), zeros_like(p)
    # a first step to make m and v non-zero (Adam is scale-invariant from zero state)
    ref.train_step(spec, p, m, v, 1, [(tokens, targets)], 1e-3, 0.0, 0.0)
    q, mq, vq = ({k: a.copy() for k, a in d.items()} for d in (p, m, v))
    _, loss, cache = ref.forward(spec, q, tokens, targets)
    grads = ref.backward(spec, q, cache)
    norm = ref.grad_norm(grads)
    assert norm == pytest.approx(math.sqrt(sum(float((g ** 2).sum()) for g in grads.values())))
    clip = norm / 4
    ref.adamw(spec, q, grads, mq, vq, 2, 1e-3, weight_decay=0.1, grad_scale=clip / norm)
    got_loss, got_norm = ref.train_step(spec, p, m, v, 2, [(tokens, targets)], 1e-3, 0.1, clip)
    assert got_loss == loss and got_norm == pytest.approx(norm, rel=1e-14)
    for k in p:
        np.testing.assert_allclose(p[k], q[k], rtol=1e-13, atol=1e-16, err_msg=k)
    # an unclipped update differs
    p2, m2, v2 = ({k: a.copy() for k, a in d.items()} for d in (p, m, v))
    ref.train_step(spec, p2, m2, v2, 3, [(tokens, targets)], 1e-3, 0.1, 0.0)
    p3, m3, v3 = ({k: a.copy() for k, a in d.items()} for d in (p, m, v))
    ref.train_step(spec, p3, m3, v3, 3, [(tokens, targets)], 1e-3, 0.1, 1e-6)
    assert not np.allclose(p2["fcw"], p3["fcw"], rtol=1e-9, atol=0)


def test_dloss_scales_gradients_linearly():
    p = random_params(TINY, seed=60)
    tokens, targets = random_batch(TINY, 2, 4, seed=60)
    _, _, cache = ref.forward(TINY, p, tokens, targets)
    g1 = ref.backward(TINY, p, cache)
    g3 = ref.backward(TINY, p, cache, dloss=1 / 3)
    for k in g1:
        np.testing.assert_allclose(g3[k], g1[k] / 3, rtol=1e-12, atol=1e-12 * np.abs(g1[k]).max())
