"""llmgen verify: the emitted C against the NumPy reference, on several small and odd specs."""

import pytest

import re

from llmgen import spec as specs
from llmgen.tensors import activations, parameters
from llmgen.verify import verify

from conftest import llmgen

CASES = [
    ("test-tiny", {}, 2, 16),                                   # powers of two
    ("test-odd", {}, 2, 13),                                    # 3 heads, vocab 97 -> 128, T = 13
    ("test-odd", {"layers": 1, "heads": 5, "channels": 40, "vocab_size": 250, "max_seq_len": 20}, 3, 7),
    ("test-tiny", {"heads": 1, "channels": 24, "layers": 3, "vocab_size": 129}, 1, 32),  # T = max_seq_len
    # T past the attention's blocks of 48 queries and 96 keys: several of each, the last ones
    # partial, and a head size (24) that is no whole number of register tiles
    ("test-odd", {"layers": 1, "heads": 5, "channels": 120, "max_seq_len": 256}, 1, 203),
    # the same with grouped queries (6 heads on 2 key/value heads) and rotary positions
    ("test-odd", {"layers": 1, "heads": 6, "kv_heads": 2, "position": "rope", "norm": "rmsnorm", "bias": False,
                  "max_seq_len": 160}, 2, 150),
    # B*T past the classifier's block of logits (a vocab of 65,000 padded to 65,024 gives 512
    # rows): 519 positions in two chunks, of 260 and 259
    ("test-odd", {"layers": 1, "heads": 2, "channels": 32, "vocab_size": 65000, "max_seq_len": 520}, 1, 519),
]


@pytest.mark.parametrize("name, overrides, B, T", CASES)
def test_verify_passes(tmp_path, name, overrides, B, T):
    spec = specs.load(name).with_overrides(**overrides)
    rows = verify(spec, B=B, T=T, build_dir=tmp_path)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    assert_covers_everything(spec, rows)


def assert_covers_everything(spec, rows):
    """The rows go forward, backward, optimizer; every activation the trainer keeps is compared
    after the forward op that writes it (per layer), every activation gradient and every
    parameter gradient (per layer) after the backward op that computes it, and every parameter
    after the steps."""
    phases = [r.phase for r in rows]
    assert phases == sorted(phases, key=["forward", "backward", "optimizer"].index)
    L = spec.n_layer

    def count(phase, name):
        return sum(1 for r in rows if r.phase == phase and (r.name == name or r.name.startswith(name + " of layer")))
    for a in activations(spec):
        if a.name == "logits":
            continue  # the C keeps a block of them: the logits row comes from a forward's rows
        assert count("forward", a.name) == (L if a.per_layer else 1), a.name
        if a.grad:
            assert count("backward", "d" + a.name) == (L if a.per_layer else 1), a.name
    for p in parameters(spec):
        assert count("backward", "d" + p.name) == (L if p.per_layer else 1), p.name
        assert sum(1 for r in rows if r.phase == "optimizer" and r.name.split(" ")[0] == p.name) == 1, p.name
    assert [r.name for r in rows if r.op == "loss"] == ["losses", "loss"]
    layers = [r.layer for r in rows if r.phase == "backward" and r.layer is not None]
    assert layers == sorted(layers, reverse=True)  # the backward runs the blocks last to first


def test_verify_command_prints_table_and_exit_status(tmp_path):
    result = llmgen("verify", "--spec", "test-odd", "-t", 11, "--steps", 3, "--build-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1].split() == ["phase", "layer", "operation", "tensor", "max", "rel", "err", "tolerance", "result"]
    assert any(re.match(r"optimizer +- +3 AdamW steps +wte +\S+ +2e-03 +ok$", line) for line in lines), lines
    assert any(re.match(r"backward +1 +layernorm 2 \+ residual +dln2w +\S+ +1e-04 +ok$", line) for line in lines)
    assert lines[-1] == f"all {len(lines) - 4} within tolerance"
