"""A NumPy transformer: forward, full manual backward and AdamW, following llm.c's train_gpt2.c
for GPT-2 and transformers' Llama for the other blocks a spec can choose (RMSNorm, rotary
positions in transformers' rotate-half layout, SwiGLU and ReLU^2, grouped-query attention,
no biases, an untied classifier).

This is the ground truth the generated C trainer is checked against, so every layer mirrors
the C layer of the same name and the same conventions:

* params are a dict name -> array with the shapes of tensors.param_shapes(spec), in
  tensors.parameters(spec) order; all arithmetic stays in the params' dtype (float32 or float64: the
  caller picks float64 for finite differences);
* a linear layer is out = inp @ W.T + b with W of shape (OC, IC), as llm.c's matmul_forward;
* layernorm uses the spec's eps (GPT-2: 1e-5) and the biased variance, and caches mean and
  rstd = 1/sqrt(var+eps); rmsnorm caches rstd = 1/sqrt(mean(x^2)+eps);
* the classifier (wte, or lm_head when untied) has no bias, and produces Vp (padded) logits, but the softmax
  only covers the first V = spec.vocab_size of them: probs[..., V:] = 0 and their gradient is 0;
* the loss is the mean over all B*T positions of -log probs[target].

Shapes in comments: B batch, T time, C channels, NH heads, HS = C/NH head size, OC/IC output
and input channels of a matmul, V vocab, Vp padded vocab, L layers.
"""

from __future__ import annotations

import math

import numpy as np

from .enums import Init, Mlp, Norm, Position
from .tensors import activation_name, param_shapes, parameters

LN_EPS = 1e-5
GELU_SCALING = math.sqrt(2.0 / math.pi)  # a Python float, so it never changes an array's dtype


# ---- encoder -----------------------------------------------------------------------------
def encoder_forward(wte, wpe, tokens):
    """out[b,t,:] = wte[tokens[b,t],:] + wpe[t,:]   -> (B,T,C)"""
    T = tokens.shape[1]
    return wte[tokens] + wpe[:T]


def encoder_backward(dwte, dwpe, dout, tokens):
    """Accumulates into dwte, dwpe: each position scatters its dout into its token's row of
    dwte (repeated tokens add up) and into row t of dwpe (summed over the batch)."""
    T, C = tokens.shape[1], dout.shape[-1]
    np.add.at(dwte, tokens.reshape(-1), dout.reshape(-1, C))
    dwpe[:T] += dout.sum(axis=0)


# ---- layernorm ---------------------------------------------------------------------------
def layernorm_forward(inp, weight, bias, eps=LN_EPS):
    """Over the last axis: mean = E[x], var = E[(x-mean)^2] (biased), rstd = 1/sqrt(var+eps),
    out = (x-mean)*rstd*weight + bias (bias None: none).   Returns out (..,C), mean (..), rstd (..)."""
    mean = inp.mean(axis=-1)
    xc = inp - mean[..., None]
    var = (xc * xc).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + float(eps))
    out = xc * rstd[..., None] * weight
    if bias is not None:
        out = out + bias
    return out, mean, rstd


def layernorm_backward(dout, inp, weight, mean, rstd):
    """With norm = (x-mean)*rstd and dnorm = dout*weight:
        dbias = sum dout,  dweight = sum dout*norm   (over all positions)
        dinp = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm*norm))   (means over C)
    the last line is the chain rule through mean and rstd, both functions of every x[i].
    Returns dinp, dweight, dbias."""
    C = inp.shape[-1]
    norm = (inp - mean[..., None]) * rstd[..., None]
    dnorm = dout * weight
    dinp = rstd[..., None] * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                              - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    dweight = (dout * norm).reshape(-1, C).sum(axis=0)
    dbias = dout.reshape(-1, C).sum(axis=0)
    return dinp, dweight, dbias


# ---- rmsnorm -----------------------------------------------------------------------------
def rmsnorm_forward(inp, weight, eps):
    """Over the last axis: rstd = 1/sqrt(E[x^2]+eps), out = x*rstd*weight.   Returns out, rstd."""
    rstd = 1.0 / np.sqrt((inp * inp).mean(axis=-1) + float(eps))
    return inp * rstd[..., None] * weight, rstd


def rmsnorm_backward(dout, inp, weight, rstd):
    """With norm = x*rstd and g = dout*weight:  dweight = sum dout*norm (over positions),
    dinp = rstd * (g - norm * mean(g*norm))   (the chain rule through rstd, a function of
    every x[i]).   Returns dinp, dweight."""
    C = inp.shape[-1]
    norm = inp * rstd[..., None]
    g = dout * weight
    dinp = rstd[..., None] * (g - norm * (g * norm).mean(axis=-1, keepdims=True))
    return dinp, (dout * norm).reshape(-1, C).sum(axis=0)


# ---- rotary positions (transformers' rotate-half layout) -------------------------------
def rope_cos_sin(T, HS, theta, dtype):
    """cos and sin (T, HS/2) of the angles t * theta^(-2i/HS): pair i of a head is channels i and
    i + HS/2 (transformers' Llama)."""
    inv = 1.0 / (float(theta) ** (np.arange(0, HS, 2, dtype=np.float64) / HS))
    angle = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def _rotate(x, cos, sin, sign):
    """x (B,T,heads,HS) rotated by the angles (sign -1: back): for each pair (a, b) = (x[i],
    x[i + HS/2]),  a' = a cos - sign b sin,  b' = b cos + sign a sin."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    c, s_ = cos[None, :, None, :], sign * sin[None, :, None, :]
    return np.concatenate([a * c - b * s_, b * c + a * s_], axis=-1)


def rope_forward(qkv, NH, KVH, theta):
    """q and k of qkv (B,T,C+2*KVH*HS) rotated by position; v as it is."""
    B, T, _ = qkv.shape
    HS = qkv.shape[-1] // (NH + 2 * KVH)
    cos, sin = rope_cos_sin(T, HS, theta, qkv.dtype)
    q = _rotate(qkv[..., :NH * HS].reshape(B, T, NH, HS), cos, sin, 1).reshape(B, T, NH * HS)
    k = _rotate(qkv[..., NH * HS:(NH + KVH) * HS].reshape(B, T, KVH, HS), cos, sin, 1).reshape(B, T, KVH * HS)
    return np.concatenate([q, k, qkv[..., (NH + KVH) * HS:]], axis=-1)


def rope_backward(dqkv, NH, KVH, theta):
    """A rotation's transpose is the rotation back: dq and dk rotated by -angle."""
    B, T, _ = dqkv.shape
    HS = dqkv.shape[-1] // (NH + 2 * KVH)
    cos, sin = rope_cos_sin(T, HS, theta, dqkv.dtype)
    dq = _rotate(dqkv[..., :NH * HS].reshape(B, T, NH, HS), cos, sin, -1).reshape(B, T, NH * HS)
    dk = _rotate(dqkv[..., NH * HS:(NH + KVH) * HS].reshape(B, T, KVH, HS), cos, sin, -1).reshape(B, T, KVH * HS)
    return np.concatenate([dq, dk, dqkv[..., (NH + KVH) * HS:]], axis=-1)


# ---- matmul (linear layer) ---------------------------------------------------------------
def matmul_forward(inp, weight, bias=None):
    """out = inp @ weight.T + bias;  inp (..,IC), weight (OC,IC), bias (OC) or None -> (..,OC)"""
    OC, IC = weight.shape
    out = (inp.reshape(-1, IC) @ weight.T).reshape(*inp.shape[:-1], OC)  # one 2-D BLAS call
    if bias is not None:
        out += bias
    return out


def matmul_backward(dout, inp, weight, has_bias=True):
    """dinp = dout @ weight;  dweight = sum over positions of dout^T inp (an outer product);
    dbias = sum over positions of dout.   Returns dinp, dweight, dbias (None without bias)."""
    OC, IC = weight.shape
    dout2 = dout.reshape(-1, OC)
    dinp = (dout2 @ weight).reshape(*dout.shape[:-1], IC)
    dweight = dout2.T @ inp.reshape(-1, IC)
    dbias = dout2.sum(axis=0) if has_bias else None
    return dinp, dweight, dbias


# ---- attention ---------------------------------------------------------------------------
def _split_heads(x, NH):
    """(B,T,NH*HS) -> (B,NH,T,HS): head h owns channels h*HS:(h+1)*HS."""
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def _merge_heads(x):
    """(B,NH,T,HS) -> (B,T,NH*HS), heads concatenated."""
    B, NH, T, HS = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def _qkv_heads(qkv, NH, KVH):
    """q (B,NH,T,HS), and k, v (B,NH,T,HS) with each of the KVH key/value heads repeated for
    its group of NH/KVH query heads (query head h uses key/value head h // (NH/KVH))."""
    HS = qkv.shape[-1] // (NH + 2 * KVH)
    q = _split_heads(qkv[..., :NH * HS], NH)
    k = np.repeat(_split_heads(qkv[..., NH * HS:(NH + KVH) * HS], KVH), NH // KVH, axis=1)
    v = np.repeat(_split_heads(qkv[..., (NH + KVH) * HS:], KVH), NH // KVH, axis=1)
    return q, k, v, HS


def attention_forward(qkv, NH, KVH=None):
    """qkv (B,T,C+2*KVH*HS) holds q = [..., :C], then k and v (KVH heads each; KVH = NH: GPT-2's
    thirds).  Per head:
        preatt[t,t2] = q[t].k[t2] / sqrt(HS)  for t2 <= t (causal)
        att[t,:] = softmax(preatt[t, :t+1]), 0 for t2 > t
        out[t] = sum_t2 att[t,t2] v[t2]
    Returns out (B,T,C), preatt and att (B,NH,T,T).  preatt's masked (future) entries are 0
    here; llm.c never writes them, so compare only its lower triangle."""
    KVH = KVH or NH
    q, k, v, HS = _qkv_heads(qkv, NH, KVH)
    T = qkv.shape[1]
    scale = 1.0 / math.sqrt(HS)
    causal = np.tril(np.ones((T, T), dtype=bool))
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    preatt = np.where(causal, scores, scores.dtype.type(0))
    masked = np.where(causal, scores, scores.dtype.type(-np.inf))
    e = np.exp(masked - masked.max(axis=-1, keepdims=True))  # the diagonal keeps the max finite
    att = e / e.sum(axis=-1, keepdims=True)
    out = _merge_heads(att @ v)
    return out, preatt, att


def attention_lse(preatt, T):
    """The flash attention's statistic: lse[t] = log(sum over t2 <= t of exp(preatt[t,t2])),
    per query (..., T), from the scores of attention_forward (their masked entries ignored)."""
    causal = np.tril(np.ones((T, T), dtype=bool))
    masked = np.where(causal, preatt, preatt.dtype.type(-np.inf))
    m = masked.max(axis=-1)
    return m + np.log(np.exp(masked - m[..., None]).sum(axis=-1))


def attention_backward(dout, qkv, att, NH, KVH=None):
    """Chain rule through out = att @ v, att = softmax(preatt), preatt = q k^T * scale:
        datt = dout v^T,  dv = att^T dout
        dpreatt = att * (datt - sum_t2 att*datt)      (softmax backward; 0 where masked)
        dq = dpreatt k * scale,  dk = dpreatt^T q * scale
    a key/value head's dk and dv summed over its group of query heads.   Returns dqkv."""
    KVH = KVH or NH
    q, k, v, HS = _qkv_heads(qkv, NH, KVH)
    B, T = qkv.shape[:2]
    scale = 1.0 / math.sqrt(HS)
    dy = _split_heads(dout, NH)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    dpreatt = att * (datt - (att * datt).sum(axis=-1, keepdims=True))
    dq = (dpreatt @ k) * scale
    dk = (dpreatt.transpose(0, 1, 3, 2) @ q) * scale
    group = NH // KVH
    dk = dk.reshape(B, KVH, group, T, HS).sum(axis=2)
    dv = dv.reshape(B, KVH, group, T, HS).sum(axis=2)
    return np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)


# ---- GELU (tanh approximation) -----------------------------------------------------------
def gelu_forward(x):
    """out = 0.5 x (1 + tanh(s (x + 0.044715 x^3))),  s = sqrt(2/pi)"""
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALING * (x + 0.044715 * x * x * x)))


def gelu_backward(dout, x):
    """d out/dx = 0.5 (1 + tanh(u)) + 0.5 x sech^2(u) s (1 + 3*0.044715 x^2),
    u = s (x + 0.044715 x^3); sech^2 = 1 - tanh^2.   Returns dinp."""
    u = GELU_SCALING * (x + 0.044715 * x * x * x)
    th = np.tanh(u)
    local = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_SCALING * (1.0 + 3 * 0.044715 * x * x)
    return dout * local


# ---- SwiGLU and ReLU^2 -------------------------------------------------------------------
def swiglu_forward(fch):
    """fch (..,2H) holds gate = [..., :H] and up = [..., H:]:  out = silu(gate) * up,
    silu(x) = x sigmoid(x).   -> (..,H)"""
    H = fch.shape[-1] // 2
    gate, up = fch[..., :H], fch[..., H:]
    return gate / (1.0 + np.exp(-gate)) * up


def swiglu_backward(dout, fch):
    """dup = dout * silu(gate);  dgate = dout * up * silu'(gate),
    silu'(x) = s(x) (1 + x (1 - s(x))), s the sigmoid.   Returns dfch (..,2H)."""
    H = fch.shape[-1] // 2
    gate, up = fch[..., :H], fch[..., H:]
    sig = 1.0 / (1.0 + np.exp(-gate))
    return np.concatenate([dout * up * sig * (1.0 + gate * (1.0 - sig)), dout * gate * sig], axis=-1)


def relu2_forward(x):
    """out = relu(x)^2"""
    r = np.maximum(x, 0)
    return r * r


def relu2_backward(dout, x):
    """d out/dx = 2 relu(x).   Returns dinp."""
    return dout * 2.0 * np.maximum(x, 0)


# ---- residual ----------------------------------------------------------------------------
def residual_forward(inp1, inp2):
    """out = inp1 + inp2"""
    return inp1 + inp2


def residual_backward(dout):
    """Both inputs get dout unchanged.   Returns dinp1, dinp2."""
    return dout, dout


# ---- softmax and cross-entropy -----------------------------------------------------------
def softmax_forward(logits, V):
    """probs[..., i] = exp(logits[i]) / sum_{j<V} exp(logits[j]) for i < V, and 0 for the
    padded entries i >= V (they are not real tokens).   (B,T,Vp) -> (B,T,Vp)"""
    real = logits[..., :V]
    e = np.exp(real - real.max(axis=-1, keepdims=True))
    probs = np.zeros_like(logits)
    probs[..., :V] = e / e.sum(axis=-1, keepdims=True)
    return probs


def crossentropy_forward(probs, targets):
    """losses[b,t] = -log probs[b,t,targets[b,t]]   -> (B,T)"""
    p = np.take_along_axis(probs, targets[..., None].astype(np.intp), axis=-1)[..., 0]
    return -np.log(p)


def crossentropy_softmax_backward(probs, targets, dlosses):
    """Through softmax and cross-entropy at once: dlogits = (probs - onehot(target)) * dloss
    for the first V entries; the padded entries get 0 (their probs are 0 and they are never
    targets).  dlosses is a scalar or (B,T).   Returns dlogits (B,T,Vp)."""
    dlogits = probs.copy()
    B, T = targets.shape
    b, t = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    dlogits[b, t, targets] -= 1.0
    dl = np.asarray(dlosses, dtype=probs.dtype)
    dlogits *= dl[..., None] if dl.ndim else dl
    return dlogits


# ---- the model ---------------------------------------------------------------------------
def init_params(spec, seed=0, dtype=np.float32):
    """GPT-2 init in tensors.parameters(spec) order, each tensor as its Param says: normal with
    Param.init_std (0.02, or 0.02/sqrt(2L) for the projections into the residual stream), ones
    or zeros.  Draws in float64 from np.random.default_rng(seed) then casts, so the float32 and
    float64 inits agree."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(spec)
    params = {}
    for t in parameters(spec):
        shape, std = shapes[t.name], t.init_std(spec.n_layer)
        if std is not None:
            params[t.name] = rng.normal(0.0, std, size=shape).astype(dtype)
        elif t.init is Init.ONES:
            params[t.name] = np.ones(shape, dtype=dtype)
        else:
            params[t.name] = np.zeros(shape, dtype=dtype)
    return params


def _check_inputs(spec, params, tokens, targets):
    for name, shape in param_shapes(spec).items():
        if params[name].shape != shape:
            raise ValueError(f"param {name} has shape {params[name].shape}, expected {shape}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B,T), got shape {tokens.shape}")
    B, T = tokens.shape
    if T > spec.max_seq_len:
        raise ValueError(f"T={T} is longer than max_seq_len {spec.max_seq_len}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= spec.padded_vocab_size):
        raise ValueError("tokens out of range [0, padded_vocab_size)")
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {targets.shape} differs from tokens {tokens.shape}")
        if targets.size and (targets.min() < 0 or targets.max() >= spec.vocab_size):
            raise ValueError("targets out of range [0, vocab_size)")
    return tokens, targets


def _norm_forward(spec, x, weight, bias):
    """layernorm or rmsnorm, as the spec says.   Returns out, mean (None for rmsnorm), rstd."""
    if spec.norm is Norm.RMSNORM:
        out, rstd = rmsnorm_forward(x, weight, spec.norm_eps)
        return out, None, rstd
    return layernorm_forward(x, weight, bias, spec.norm_eps)


def _norm_backward(spec, dout, x, weight, mean, rstd):
    """Returns dinp, dweight, dbias (None without a bias)."""
    if spec.norm is Norm.RMSNORM:
        dinp, dweight = rmsnorm_backward(dout, x, weight, rstd)
        return dinp, dweight, None
    dinp, dweight, dbias = layernorm_backward(dout, x, weight, mean, rstd)
    return dinp, dweight, dbias if spec.bias else None


def _mlp_forward(spec, fch):
    return {Mlp.GELU: gelu_forward, Mlp.SWIGLU: swiglu_forward, Mlp.RELU2: relu2_forward}[spec.mlp](fch)


def _mlp_backward(spec, dout, fch):
    return {Mlp.GELU: gelu_backward, Mlp.SWIGLU: swiglu_backward, Mlp.RELU2: relu2_backward}[spec.mlp](dout, fch)


def forward(spec, params, tokens, targets=None):
    """The forward pass on tokens (B,T).  Returns (logits (B,T,Vp), mean loss as a float or None
    without targets, cache).  The cache holds the tensors.activations(spec) by name (per-layer
    ones stacked as (L,B,T,...); qkv after the rotation, when rope), plus "preatt", "att",
    "attproj", "fcproj", "probs", "tokens" and "targets" for backward."""
    tokens, targets = _check_inputs(spec, params, tokens, targets)
    L, NH, KVH = spec.n_layer, spec.n_head, spec.kv_head_count
    p = params
    g = p.get
    rope = spec.position is Position.ROPE
    act = activation_name(spec)
    cache = {"tokens": tokens, "targets": targets}
    encoded = p["wte"][tokens] if rope else encoder_forward(p["wte"], p["wpe"], tokens)
    cache["encoded"] = encoded
    names = ("ln1", "ln1_mean", "ln1_rstd", "qkv", "atty", "preatt", "att", "att_lse", "attproj", "residual2",
             "ln2", "ln2_mean", "ln2_rstd", "fch", act, "fcproj", "residual3")
    per_layer = {name: [] for name in names}

    def layer(name, l):
        return g(name)[l] if name in p else None
    residual = encoded
    for l in range(L):
        ln1, ln1_mean, ln1_rstd = _norm_forward(spec, residual, p["ln1w"][l], layer("ln1b", l))
        qkv = matmul_forward(ln1, p["qkvw"][l], layer("qkvb", l))
        if rope:
            qkv = rope_forward(qkv, NH, KVH, spec.rope_theta)
        atty, preatt, att = attention_forward(qkv, NH, KVH)
        att_lse = attention_lse(preatt, tokens.shape[1])
        attproj = matmul_forward(atty, p["attprojw"][l], layer("attprojb", l))
        residual2 = residual_forward(residual, attproj)
        ln2, ln2_mean, ln2_rstd = _norm_forward(spec, residual2, p["ln2w"][l], layer("ln2b", l))
        fch = matmul_forward(ln2, p["fcw"][l], layer("fcb", l))
        hidden = _mlp_forward(spec, fch)
        fcproj = matmul_forward(hidden, p["fcprojw"][l], layer("fcprojb", l))
        residual3 = residual_forward(residual2, fcproj)
        for name, value in zip(names, (ln1, ln1_mean, ln1_rstd, qkv, atty, preatt, att, att_lse, attproj,
                                       residual2, ln2, ln2_mean, ln2_rstd, fch, hidden, fcproj, residual3)):
            if value is not None:
                per_layer[name].append(value)
        residual = residual3
    for name, values in per_layer.items():
        if values:
            cache[name] = np.stack(values)
    lnf, lnf_mean, lnf_rstd = _norm_forward(spec, residual, p["lnfw"], g("lnfb"))
    logits = matmul_forward(lnf, p["wte"] if spec.tie_embeddings else p["lm_head"])  # no bias: (B,T,Vp)
    probs = softmax_forward(logits, spec.vocab_size)
    cache.update(lnf=lnf, lnf_rstd=lnf_rstd, logits=logits, probs=probs)
    if lnf_mean is not None:
        cache["lnf_mean"] = lnf_mean
    loss = None
    if targets is not None:
        losses = crossentropy_forward(probs, targets)
        cache["losses"] = losses
        loss = float(losses.mean())
    return logits, loss, cache


def backward(spec, params, cache, dloss=1.0, record=None):
    """Gradients of dloss * (mean loss over B*T) wrt every param, by hand, layer by layer in
    reverse.  Needs a cache from forward() called with targets.  Returns a dict like params.
    With a dict `record`, also the gradients of the activations that the C trainer keeps one
    for (tensors.activations with grad), by name, per-layer ones stacked (L,B,T,...): qkv's
    is the matmul output's (after rope's backward), residual2's and residual3's the total
    over both of their uses."""
    targets = cache["targets"]
    if targets is None:
        raise ValueError("backward needs a forward pass with targets")
    tokens = cache["tokens"]
    p = params
    L, NH, KVH = spec.n_layer, spec.n_head, spec.kv_head_count
    rope = spec.position is Position.ROPE
    act = activation_name(spec)
    B, T = tokens.shape
    grads = {name: np.zeros_like(value) for name, value in params.items()}

    def set_grads(l, **named):  # a layer's parameter gradients; None: the tensor is not there
        for name, value in named.items():
            if value is not None:
                grads[name][l] = value

    def stat(name, l=None):
        if name not in cache:
            return None
        return cache[name] if l is None else cache[name][l]

    # every position's loss enters the mean with weight 1/(B*T)
    dlogits = crossentropy_softmax_backward(cache["probs"], targets, float(dloss) / (B * T))
    classifier = "wte" if spec.tie_embeddings else "lm_head"
    dlnf, dclassifier, _ = matmul_backward(dlogits, cache["lnf"], p[classifier], has_bias=False)
    grads[classifier] += dclassifier
    last = cache["residual3"][L - 1]
    dresidual, grads["lnfw"], dlnfb = _norm_backward(spec, dlnf, last, p["lnfw"], stat("lnf_mean"), cache["lnf_rstd"])
    if dlnfb is not None:
        grads["lnfb"] = dlnfb
    kept = {name: [None] * L for name in ("residual3", act, "fch", "ln2", "residual2", "atty", "qkv", "ln1")}

    for l in reversed(range(L)):
        residual = cache["encoded"] if l == 0 else cache["residual3"][l - 1]
        kept["residual3"][l] = dresidual
        # residual3 = residual2 + fcproj
        dresidual2, dfcproj = residual_backward(dresidual)
        dhidden, dw, db = matmul_backward(dfcproj, cache[act][l], p["fcprojw"][l], has_bias=spec.bias)
        set_grads(l, fcprojw=dw, fcprojb=db)
        dfch = _mlp_backward(spec, dhidden, cache["fch"][l])
        kept[act][l], kept["fch"][l] = dhidden, dfch
        dln2, dw, db = matmul_backward(dfch, cache["ln2"][l], p["fcw"][l], has_bias=spec.bias)
        set_grads(l, fcw=dw, fcb=db)
        dres2_ln, dw, db = _norm_backward(spec, dln2, cache["residual2"][l], p["ln2w"][l], stat("ln2_mean", l),
                                          cache["ln2_rstd"][l])
        set_grads(l, ln2w=dw, ln2b=db)
        dresidual2 = dresidual2 + dres2_ln  # residual2 feeds both ln2 and residual3
        kept["ln2"][l], kept["residual2"][l] = dln2, dresidual2
        # residual2 = residual + attproj
        dresidual, dattproj = residual_backward(dresidual2)
        datty, dw, db = matmul_backward(dattproj, cache["atty"][l], p["attprojw"][l], has_bias=spec.bias)
        set_grads(l, attprojw=dw, attprojb=db)
        dqkv = attention_backward(datty, cache["qkv"][l], cache["att"][l], NH, KVH)
        if rope:
            dqkv = rope_backward(dqkv, NH, KVH, spec.rope_theta)
        dln1, dw, db = matmul_backward(dqkv, cache["ln1"][l], p["qkvw"][l], has_bias=spec.bias)
        kept["atty"][l], kept["qkv"][l], kept["ln1"][l] = datty, dqkv, dln1
        set_grads(l, qkvw=dw, qkvb=db)
        dres_ln, dw, db = _norm_backward(spec, dln1, residual, p["ln1w"][l], stat("ln1_mean", l),
                                         cache["ln1_rstd"][l])
        set_grads(l, ln1w=dw, ln1b=db)
        dresidual = dresidual + dres_ln  # the block input feeds both ln1 and residual2

    if record is not None:
        record.update({name: np.stack(values) for name, values in kept.items()}, lnf=dlnf, encoded=dresidual)
    if rope:
        np.add.at(grads["wte"], tokens.reshape(-1), dresidual.reshape(-1, dresidual.shape[-1]))
    else:
        encoder_backward(grads["wte"], grads["wpe"], dresidual, tokens)
    return grads


# ---- optimizer ---------------------------------------------------------------------------
def grad_norm(grads):
    """Global L2 norm over all gradient tensors (accumulated in float64)."""
    total = 0.0
    for g in grads.values():
        total += float(np.square(g, dtype=np.float64).sum())
    return math.sqrt(total)


def lr_at(step, max_steps, lr, warmup, final_frac):
    """llm.c's schedule: linear warmup over `warmup` steps (step 0 gets lr/warmup), then cosine
    decay from lr to lr*final_frac at step == max_steps.  With max_steps <= warmup there is no
    decay phase: any step >= warmup gets the final lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * final_frac
    if max_steps <= warmup:
        decay_ratio = 1.0
    else:
        decay_ratio = min(max((step - warmup) / (max_steps - warmup), 0.0), 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (lr - min_lr)


def adamw(spec, params, grads, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
          grad_scale=1.0):
    """One AdamW update, in place on params, m and v (dicts like params).  t is the 1-based step
    for the bias correction.  Weight decay applies only to the tensors whose Param has decay
    (the 2-D weights):
        g = grad*grad_scale;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd p)"""
    lr, beta1, beta2, eps = float(lr), float(beta1), float(beta2), float(eps)
    grad_scale = float(grad_scale)
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    decayed = {p.name for p in parameters(spec) if p.decay}
    for name, param in params.items():
        wd = float(weight_decay) if name in decayed else 0.0
        g = grads[name] * grad_scale
        m[name] *= beta1
        m[name] += (1.0 - beta1) * g
        v[name] *= beta2
        v[name] += (1.0 - beta2) * g * g
        mhat = m[name] / bc1
        vhat = v[name] / bc2
        param -= lr * (mhat / (np.sqrt(vhat) + eps) + wd * param)


def train_step(spec, params, m, v, t, batches, lr, weight_decay, grad_clip):
    """One optimizer step over micro-batches [(tokens, targets), ...]: gradients accumulate with
    dloss = 1/len(batches) (so they are the mean over all of them), loss is the mean of the
    micro-batch losses, norm the global grad norm before clipping; if grad_clip > 0 and
    norm > grad_clip the update uses grads * grad_clip/norm.  Updates params, m, v in place
    (t is the 1-based step).  Returns (loss, norm)."""
    if not batches:
        raise ValueError("train_step needs at least one micro-batch")
    n = len(batches)
    total = None
    loss_sum = 0.0
    for tokens, targets in batches:
        _, loss, cache = forward(spec, params, tokens, targets)
        grads = backward(spec, params, cache, dloss=1.0 / n)
        loss_sum += loss
        if total is None:
            total = grads
        else:
            for name in total:
                total[name] += grads[name]
    norm = grad_norm(total)
    scale = grad_clip / norm if grad_clip > 0 and norm > grad_clip else 1.0
    adamw(spec, params, total, m, v, t, lr, weight_decay=weight_decay, grad_scale=scale)
    return loss_sum / n, norm
