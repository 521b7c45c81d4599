import pytest

from llmgen import spec as specs
from llmgen.tensors import num_params

from conftest import llmgen


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
