import json

import pytest

from llmgen import spec as specs
from llmgen.tensors import num_acts, num_params

from conftest import llmgen, refused


def test_presets_load_with_gpt2_sizes():
    expected = {"gpt2-124m": (12, 12, 768), "gpt2-350m": (24, 16, 1024),
                "gpt2-774m": (36, 20, 1280), "gpt2-1558m": (48, 25, 1600)}
    for name, (L, NH, C) in expected.items():
        s = specs.load(name)
        assert (s.n_layer, s.n_head, s.n_embd) == (L, NH, C)
        assert (s.vocab_size, s.padded_vocab_size, s.max_seq_len) == (50257, 50304, 1024)
    assert {"test-tiny", "test-odd", "gpt2-tiny"} <= set(specs.preset_names())


def test_gpt2_124m_parameter_count():
    s = specs.load("gpt2-124m")
    assert num_params(s, padded=False) == 124_439_808
    assert num_params(s) == 124_475_904


def test_overrides_make_a_new_checked_spec():
    s = specs.load("gpt2-124m").with_overrides(layers=2, vocab_size=1000)
    assert (s.n_layer, s.vocab_size, s.padded_vocab_size) == (2, 1000, 1024)
    assert s.name == "gpt2-124m+layers=2,vocab_size=1000"
    with pytest.raises(specs.SpecError, match="heads"):
        specs.load("gpt2-124m").with_overrides(heads=7)


GOOD = 'layers = 2\nheads = 2\nchannels = 32\nvocab_size = 64\nmax_seq_len = 16\n'


@pytest.mark.parametrize("text, problem", [
    (GOOD + "dropout = 0.1\n", "field 'dropout': unknown key"),
    (GOOD.replace("layers = 2\n", ""), "field 'layers': missing"),
    (GOOD.replace("heads = 2", 'heads = "two"'), "field 'heads': must be an integer"),
    (GOOD.replace("channels = 32", "channels = 32.0"), "field 'channels': must be an integer"),
    (GOOD.replace("layers = 2", "layers = 0"), "field 'layers': must be positive"),
    (GOOD.replace("max_seq_len = 16", "max_seq_len = -4"), "field 'max_seq_len': must be positive"),
    (GOOD.replace("heads = 2", "heads = 3"), "field 'channels': 32 is not divisible by heads 3"),
    (GOOD + "padded_vocab_size = 60\n", "field 'padded_vocab_size': 60 is smaller than vocab_size 64"),
    (GOOD.replace("vocab_size = 64", "vocab_size = 70000"), "field 'padded_vocab_size'"),
    ("layers = [", "not valid TOML"),
])
def test_bad_spec_gives_one_line_naming_file_and_field(tmp_path, text, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(specs.SpecError, match="bad.toml"):
        specs.load(str(path))
    result = llmgen("info", "--spec", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert problem in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_spec_file_and_unknown_preset():
    result = llmgen("info", "--spec", "no/such/spec.toml")
    assert result.returncode == 1 and "no such spec file" in result.stderr
    result = llmgen("info", "--spec", "gpt2-13b")
    assert result.returncode == 1 and "neither a preset" in result.stderr


def test_padding_defaults_to_a_multiple_of_128(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(GOOD.replace("vocab_size = 64", "vocab_size = 50257"))
    s = specs.load(str(path))
    assert s.padded_vocab_size == 50304 and s.name == "s"


@pytest.mark.parametrize("text, key, problem", [
    (GOOD.replace("layers = 2", "layers = [1, 2]"), "layers", "must be an integer, got [1, 2] (list)"),
    (GOOD.replace("heads = 2", "heads = {a = 1}"), "heads", "must be an integer, got {'a': 1} (dict)"),
    (GOOD + "[name]\nfirst = 1\n", "name", "must be a non-empty string"),
    (GOOD + "name = [[1, 2], {x = 'y'}]\n", "name", "must be a non-empty string"),
    (GOOD.replace("layers = 2", "layers = [" + "1, " * 200 + "1]"), "layers", "..."),  # cut short, one line
    (GOOD.replace("channels = 32", "channels = 99999999999999999998"), "channels",
     "is too large: sizes are 32-bit ints in the trainer (at most 2**31 - 1 = 2,147,483,647)"),
    (GOOD.replace("layers = 2", "layers = 9223372036854775807"), "layers", "is too large"),
    (GOOD.replace("max_seq_len = 16", "max_seq_len = 2147483648"), "max_seq_len", "is too large"),
    # the products: the trainer's int32 arithmetic
    (GOOD.replace("channels = 32", "channels = 23172"), "channels",
     "4 * channels * channels = 2,147,766,336 elements exceeds 2**31 - 1 = 2,147,483,647"),
    (GOOD.replace("max_seq_len = 16", "max_seq_len = 67108864"), "max_seq_len",
     "max_seq_len * channels = 2,147,483,648 elements exceeds 2**31 - 1"),
])
def test_nested_huge_and_overflowing_values_are_refused(tmp_path, text, key, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    message = refused(llmgen("info", "--spec", path), f"{path}: field '{key}': ", problem)
    assert len(message) < 300


def test_the_largest_sizes_the_rule_allows_are_accepted_and_counted_exactly(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text(GOOD.replace("channels = 32", "channels = 23170").replace("heads = 2", "heads = 2317")
                    .replace("layers = 2", "layers = 2147483647").replace("max_seq_len = 16", "max_seq_len = 92681"))
    s = specs.load(str(path))
    out = llmgen("info", "--spec", path, "-b", 1000, "-t", 92681)
    assert out.returncode == 0, out.stderr
    # the activations of B=1000, T=92681: far beyond int64, printed exactly (not wrapped)
    acts = num_acts(s, 1000, 92681)
    assert acts > 2 ** 63 and f"{acts * 4 / 2 ** 20:>12,.1f} MiB" in out.stdout


@pytest.mark.parametrize("name", ["/abs", "../..", "..", ".", ".hidden", "-flag", "a/b", "a\nb", "$(shell rm x)",
                                  "a b", "x" * 65, "", "caf\u00e9", "a\"b", "a\\b"])
def test_names_that_are_not_plain_are_refused(tmp_path, name):
    path = tmp_path / "bad.toml"
    path.write_text(f"name = {json.dumps(name)}\n" + GOOD)
    refused(llmgen("info", "--spec", path), f"{path}: field 'name': ")


def test_plain_and_derived_names():
    for name in ["gpt2-124m", "my_model.v2", "_x", "9", "a" * 64, "base+layers=3,heads=4"]:
        assert specs.from_dict({"name": name, **RAW}, "t").name == name
    # a name made from a file's stem or from overrides is made plain, not refused
    assert specs.from_dict(RAW, "/some/dir/my model (1).toml").name == "my_model__1_"
    assert specs.from_dict(RAW, ".hidden.toml").name == "hidden"
    s = specs.from_dict({"name": "n" * 60, **RAW}, "t").with_overrides(layers=3, heads=4)
    assert specs.valid_name(s.name) and len(s.name) == specs.NAME_MAX
    assert s.name != specs.from_dict({"name": "n" * 60, **RAW}, "t").with_overrides(layers=3, heads=8).name
    for text in ["my model (1)", "../..", "/abs", "a\nb", "$(shell x)", "", "-", "é" * 100]:
        assert specs.valid_name(specs.safe_name(text)), text


RAW = {"layers": 2, "heads": 2, "channels": 32, "vocab_size": 64, "max_seq_len": 16}
