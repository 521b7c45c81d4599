"""Synthetic token data with structure a small model can learn: a sparse Markov chain."""

from __future__ import annotations

import numpy as np

SUCCESSOR_PROBS = np.array([0.5, 0.25, 0.15, 0.1])  # each state's four possible next states


def markov_tokens(vocab_size: int, n_train: int, n_val: int, seed: int = 0):
    """Train and val token arrays from one chain over up to 256 of the vocab's ids, and the
    chain's entropy rate in nats per token (the loss a perfect bigram model reaches)."""
    rng = np.random.default_rng(seed)
    k = min(vocab_size, 256)
    ids = rng.choice(vocab_size, size=k, replace=False)          # which token ids the chain uses
    successors = np.stack([rng.choice(k, size=len(SUCCESSOR_PROBS), replace=False) for _ in range(k)])
    cdf = np.cumsum(SUCCESSOR_PROBS)
    n = n_train + n_val
    picks = np.searchsorted(cdf, rng.random(n), side="right").clip(max=len(cdf) - 1)
    states = np.empty(n, dtype=np.int64)
    state = 0
    for i in range(n):  # a plain loop: a few hundred thousand steps take well under a second
        state = successors[state, picks[i]]
        states[i] = state
    tokens = ids[states].astype(np.uint16)
    entropy = float(-(SUCCESSOR_PROBS * np.log(SUCCESSOR_PROBS)).sum())
    return tokens[:n_train], tokens[n_train:], entropy
