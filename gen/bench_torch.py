"""The yardstick of `llmgen bench --compare-torch`: the same GPT-2 trained by PyTorch in eager
mode, on the same threads, sizes and batch, timed the same way (each step's wall time).

The model is nanoGPT's: token and position embeddings, pre-norm blocks of LayerNorm, causal
self-attention (torch's scaled_dot_product_attention), a tanh-GELU MLP, a final LayerNorm and
a classifier tied to the token embedding over the padded vocabulary, trained with AdamW
(betas 0.9, 0.95, eps 1e-8) and gradient clipping at 1.0, as the emitted trainer is.

Run as `python -m llmgen.bench_torch L NH C Vp maxT B T threads steps`; it prints one JSON
line: {"step_ms": [...], "torch": version, "peak_rss_bytes": ...}. With `sample` first
(`python -m llmgen.bench_torch sample L NH C Vp maxT threads prompt new`) it generates instead,
a KV-cache loop as PyTorch users write one (torch.no_grad, the keys and values of every layer
in preallocated buffers, one position a step), and prints {"tokens_per_s": ..., "seconds": ...}.
Needs torch (the optional extra `bench`: pip install "llmgen[bench]").
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _model(torch, L, NH, C, Vp, maxT):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.c_fcproj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.c_fcproj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(Vp, C), nn.Embedding(maxT, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # tied
            return F.cross_entropy(logits.reshape(-1, Vp), targets.reshape(-1))

    return GPT()


def generate(argv: list[str]) -> None:
    """Random weights (the speed does not depend on them), temperature-1 sampling."""
    import torch
    F = torch.nn.functional
    L, NH, C, Vp, maxT, threads, prompt, new = (int(a) for a in argv)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(torch, L, NH, C, Vp, maxT).eval()
    HS = C // NH
    keys = torch.zeros(L, 1, NH, prompt + new, HS)
    values = torch.zeros(L, 1, NH, prompt + new, HS)

    def step(idx, pos):  # idx (1, n) at positions pos .. pos + n - 1: the last row's logits
        n = idx.shape[1]
        x = model.wte(idx) + model.wpe(torch.arange(pos, pos + n))
        for l, block in enumerate(model.h):
            q, k, v = block.c_attn(block.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(1, n, NH, HS).transpose(1, 2) for t in (q, k, v))
            keys[l, :, :, pos:pos + n], values[l, :, :, pos:pos + n] = k, v
            y = F.scaled_dot_product_attention(q, keys[l, :, :, :pos + n], values[l, :, :, :pos + n],
                                               is_causal=n > 1)
            x = x + block.c_proj(y.transpose(1, 2).contiguous().view(1, n, C))
            x = x + block.c_fcproj(F.gelu(block.c_fc(block.ln_2(x)), approximate="tanh"))
        return model.ln_f(x[:, -1]) @ model.wte.weight.T

    with torch.no_grad():
        idx = torch.randint(0, Vp, (1, prompt))
        logits = step(idx, 0)  # the prompt, once
        t0 = time.perf_counter()
        for pos in range(prompt, prompt + new):
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1)
            logits = step(token, pos)
        seconds = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": new / seconds, "seconds": seconds, "torch": torch.__version__}))


def main(argv: list[str]) -> None:
    if argv and argv[0] == "sample":
        return generate(argv[1:])
    import torch
    L, NH, C, Vp, maxT, B, T, threads, steps = (int(a) for a in argv)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(torch, L, NH, C, Vp, maxT)
    for name, p in model.named_parameters():  # GPT-2's init, as the trainer's (speed does not depend on it)
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, 0.02 / (2 * L) ** 0.5 if name.endswith(("c_proj.weight", "c_fcproj.weight"))
                                  else 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    data = torch.randint(0, Vp, (steps, B, T + 1))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss = model(data[step, :, :-1], data[step, :, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append((time.perf_counter() - t0) * 1e3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"step_ms": times, "torch": torch.__version__, "peak_rss_bytes": rss,
                      "final_loss": loss.item()}))


if __name__ == "__main__":
    main(sys.argv[1:])
