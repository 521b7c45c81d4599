"""A NumPy GPT-2: forward, full manual backward and AdamW, following llm.c's train_gpt2.c.

This is the ground truth the generated C trainer is checked against, so every layer mirrors
the C layer of the same name and the same conventions:

* params are a dict name -> array with the shapes of tensors.param_shapes(spec), in
  tensors.parameters(spec) order; all arithmetic stays in the params' dtype (float32 or float64: the
  caller picks float64 for finite differences);
* a linear layer is out = inp @ W.T + b with W of shape (OC, IC), as llm.c's matmul_forward;
* layernorm uses eps 1e-5 and the biased variance, and caches mean and rstd = 1/sqrt(var+eps);
* the classifier is tied to wte, has no bias, and produces Vp (padded) logits, but the softmax
  only covers the first V = spec.vocab_size of them: probs[..., V:] = 0 and their gradient is 0;
* the loss is the mean over all B*T positions of -log probs[target].

Shapes in comments: B batch, T time, C channels, NH heads, HS = C/NH head size, OC/IC output
and input channels of a matmul, V vocab, Vp padded vocab, L layers.
"""

from __future__ import annotations

import math

import numpy as np

from .enums import Init
from .tensors import param_shapes, parameters

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
def layernorm_forward(inp, weight, bias):
    """Over the last axis: mean = E[x], var = E[(x-mean)^2] (biased), rstd = 1/sqrt(var+eps),
    out = (x-mean)*rstd*weight + bias.   Returns out (..,C), mean (..), rstd (..)."""
    mean = inp.mean(axis=-1)
    xc = inp - mean[..., None]
    var = (xc * xc).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    out = xc * rstd[..., None] * weight + bias
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
    """(B,T,C) -> (B,NH,T,HS): head h owns channels h*HS:(h+1)*HS."""
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def _merge_heads(x):
    """(B,NH,T,HS) -> (B,T,C), heads concatenated."""
    B, NH, T, HS = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def attention_forward(qkv, NH):
    """qkv (B,T,3C) holds q = [..., :C], k = [..., C:2C], v = [..., 2C:].  Per head:
        preatt[t,t2] = q[t].k[t2] / sqrt(HS)  for t2 <= t (causal)
        att[t,:] = softmax(preatt[t, :t+1]), 0 for t2 > t
        out[t] = sum_t2 att[t,t2] v[t2]
    Returns out (B,T,C), preatt and att (B,NH,T,T).  preatt's masked (future) entries are 0
    here; llm.c never writes them, so compare only its lower triangle."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    HS = C // NH
    scale = 1.0 / math.sqrt(HS)
    q = _split_heads(qkv[..., :C], NH)
    k = _split_heads(qkv[..., C:2 * C], NH)
    v = _split_heads(qkv[..., 2 * C:], NH)
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


def attention_backward(dout, qkv, att, NH):
    """Chain rule through out = att @ v, att = softmax(preatt), preatt = q k^T * scale:
        datt = dout v^T,  dv = att^T dout
        dpreatt = att * (datt - sum_t2 att*datt)      (softmax backward; 0 where masked)
        dq = dpreatt k * scale,  dk = dpreatt^T q * scale
    Returns dqkv (B,T,3C)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    scale = 1.0 / math.sqrt(C // NH)
    q = _split_heads(qkv[..., :C], NH)
    k = _split_heads(qkv[..., C:2 * C], NH)
    v = _split_heads(qkv[..., 2 * C:], NH)
    dy = _split_heads(dout, NH)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    dpreatt = att * (datt - (att * datt).sum(axis=-1, keepdims=True))
    dq = (dpreatt @ k) * scale
    dk = (dpreatt.transpose(0, 1, 3, 2) @ q) * scale
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


def forward(spec, params, tokens, targets=None):
    """The GPT-2 forward pass on tokens (B,T).  Returns (logits (B,T,Vp), mean loss as a float
    or None without targets, cache).  The cache holds the tensors.activations(spec) by name
    (per-layer ones stacked as (L,B,T,...)), plus "tokens" and "targets" for backward."""
    tokens, targets = _check_inputs(spec, params, tokens, targets)
    L, NH = spec.n_layer, spec.n_head
    p = params
    cache = {"tokens": tokens, "targets": targets}
    encoded = encoder_forward(p["wte"], p["wpe"], tokens)
    cache["encoded"] = encoded
    per_layer = {name: [] for name in (
        "ln1", "ln1_mean", "ln1_rstd", "qkv", "atty", "preatt", "att", "att_lse", "attproj", "residual2",
        "ln2", "ln2_mean", "ln2_rstd", "fch", "fch_gelu", "fcproj", "residual3")}
    residual = encoded
    for l in range(L):
        ln1, ln1_mean, ln1_rstd = layernorm_forward(residual, p["ln1w"][l], p["ln1b"][l])
        qkv = matmul_forward(ln1, p["qkvw"][l], p["qkvb"][l])
        atty, preatt, att = attention_forward(qkv, NH)
        att_lse = attention_lse(preatt, tokens.shape[1])
        attproj = matmul_forward(atty, p["attprojw"][l], p["attprojb"][l])
        residual2 = residual_forward(residual, attproj)
        ln2, ln2_mean, ln2_rstd = layernorm_forward(residual2, p["ln2w"][l], p["ln2b"][l])
        fch = matmul_forward(ln2, p["fcw"][l], p["fcb"][l])
        fch_gelu = gelu_forward(fch)
        fcproj = matmul_forward(fch_gelu, p["fcprojw"][l], p["fcprojb"][l])
        residual3 = residual_forward(residual2, fcproj)
        for name, value in (("ln1", ln1), ("ln1_mean", ln1_mean), ("ln1_rstd", ln1_rstd),
                            ("qkv", qkv), ("atty", atty), ("preatt", preatt), ("att", att), ("att_lse", att_lse),
                            ("attproj", attproj), ("residual2", residual2), ("ln2", ln2),
                            ("ln2_mean", ln2_mean), ("ln2_rstd", ln2_rstd), ("fch", fch),
                            ("fch_gelu", fch_gelu), ("fcproj", fcproj), ("residual3", residual3)):
            per_layer[name].append(value)
        residual = residual3
    for name, values in per_layer.items():
        cache[name] = np.stack(values)
    lnf, lnf_mean, lnf_rstd = layernorm_forward(residual, p["lnfw"], p["lnfb"])
    logits = matmul_forward(lnf, p["wte"])  # tied classifier, no bias: (B,T,Vp)
    probs = softmax_forward(logits, spec.vocab_size)
    cache.update(lnf=lnf, lnf_mean=lnf_mean, lnf_rstd=lnf_rstd, logits=logits, probs=probs)
    loss = None
    if targets is not None:
        losses = crossentropy_forward(probs, targets)
        cache["losses"] = losses
        loss = float(losses.mean())
    return logits, loss, cache


def backward(spec, params, cache, dloss=1.0):
    """Gradients of dloss * (mean loss over B*T) wrt every param, by hand, layer by layer in
    reverse.  Needs a cache from forward() called with targets.  Returns a dict like params."""
    targets = cache["targets"]
    if targets is None:
        raise ValueError("backward needs a forward pass with targets")
    tokens = cache["tokens"]
    p = params
    L, NH = spec.n_layer, spec.n_head
    B, T = tokens.shape
    grads = {name: np.zeros_like(value) for name, value in params.items()}

    # every position's loss enters the mean with weight 1/(B*T)
    dlogits = crossentropy_softmax_backward(cache["probs"], targets, float(dloss) / (B * T))
    dlnf, dwte_classifier, _ = matmul_backward(dlogits, cache["lnf"], p["wte"], has_bias=False)
    grads["wte"] += dwte_classifier
    last = cache["residual3"][L - 1]
    dresidual, grads["lnfw"], grads["lnfb"] = layernorm_backward(
        dlnf, last, p["lnfw"], cache["lnf_mean"], cache["lnf_rstd"])

    for l in reversed(range(L)):
        residual = cache["encoded"] if l == 0 else cache["residual3"][l - 1]
        # residual3 = residual2 + fcproj
        dresidual2, dfcproj = residual_backward(dresidual)
        dfch_gelu, grads["fcprojw"][l], grads["fcprojb"][l] = matmul_backward(
            dfcproj, cache["fch_gelu"][l], p["fcprojw"][l])
        dfch = gelu_backward(dfch_gelu, cache["fch"][l])
        dln2, grads["fcw"][l], grads["fcb"][l] = matmul_backward(dfch, cache["ln2"][l], p["fcw"][l])
        dres2_ln, grads["ln2w"][l], grads["ln2b"][l] = layernorm_backward(
            dln2, cache["residual2"][l], p["ln2w"][l], cache["ln2_mean"][l], cache["ln2_rstd"][l])
        dresidual2 = dresidual2 + dres2_ln  # residual2 feeds both ln2 and residual3
        # residual2 = residual + attproj
        dresidual, dattproj = residual_backward(dresidual2)
        datty, grads["attprojw"][l], grads["attprojb"][l] = matmul_backward(
            dattproj, cache["atty"][l], p["attprojw"][l])
        dqkv = attention_backward(datty, cache["qkv"][l], cache["att"][l], NH)
        dln1, grads["qkvw"][l], grads["qkvb"][l] = matmul_backward(dqkv, cache["ln1"][l], p["qkvw"][l])
        dres_ln, grads["ln1w"][l], grads["ln1b"][l] = layernorm_backward(
            dln1, residual, p["ln1w"][l], cache["ln1_mean"][l], cache["ln1_rstd"][l])
        dresidual = dresidual + dres_ln  # the block input feeds both ln1 and residual2

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
