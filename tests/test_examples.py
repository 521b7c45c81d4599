"""The emitted programs committed under examples/ are current, and every emitted file describes
only itself: no comment of the variant not emitted (another target, precision or matmul path),
no Python internals of the generator."""

import re
from pathlib import Path

import pytest

from llmgen import spec as specs
from llmgen.emit import render, render_kernels

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "gpt2-124m"
REGENERATE = "llmgen emit --spec gpt2-124m --target all --precision bf16 -o examples/gpt2-124m"
# names of the generator's own code that an emitted file must not mention
PYTHON_INTERNALS = re.compile(r"render_kernels|kernel_constants|cuda_context|c_context|emit\.py|tensors\.py|"
                              r"llmgen\.\w|cformat|_pad\b")


def test_examples_are_current():
    files = render(specs.load("gpt2-124m"), "all", "bf16")
    assert sorted(p.name for p in EXAMPLES.iterdir()) == sorted(files), f"regenerate with: {REGENERATE}"
    for name, text in files.items():
        assert (EXAMPLES / name).read_text() == text, f"examples/gpt2-124m/{name} is stale: {REGENERATE}"


def test_the_readme_shows_the_command_and_a_current_excerpt():
    readme = (EXAMPLES.parent.parent / "README.md").read_text()
    assert REGENERATE in readme
    excerpt = readme.split("```c\n", 1)[1].split("```", 1)[0]
    source = (EXAMPLES / "train_gpt2.c").read_text()
    lines = [line for line in excerpt.splitlines() if line.strip() and line.strip() != "..."]
    assert 10 <= len(excerpt.splitlines()) <= 20
    assert all(line in source.splitlines() for line in lines), "the README's excerpt is not in examples/"


VARIANTS = [("c", "fp32", "cublaslt")] + [("cuda", p, m) for p in ("fp32", "bf16") for m in ("cublaslt", "tiled")]


@pytest.mark.parametrize("target, precision, matmul", VARIANTS)
def test_each_emitted_file_describes_only_itself(target, precision, matmul):
    files = render(specs.load("gpt2-124m"), target, precision, matmul)
    for name, text in files.items():
        assert not PYTHON_INTERNALS.search(text), (name, PYTHON_INTERNALS.search(text).group(0))
    if target == "c":
        src = files["train_gpt2.c"]
        assert not re.search(r"cuda|gpu|floatX|nvcc|cublas|master_memory", src, re.I)
        assert "writes version 3." in src and "writes version 5" not in src
        assert not re.search(r"nvcc|cuda|cublas", files["Makefile"], re.I)
        return
    src, bf16, cublaslt = files["train_gpt2.cu"], precision == "bf16", matmul == "cublaslt"
    # the checkpoint version it writes, said once and true
    assert re.findall(r"writes version (\d)", src) == ["5" if bf16 else "3"]
    assert f"Precision: {precision}." in src
    # fp32 has no master weights; bf16 always has them
    assert ("master_memory" in src) == bf16
    assert not re.search(r"NULL in fp32|fp32: a no-op|in fp32 the", src)
    if bf16:
        assert "the fp32 parameters are their own master weights" not in src
    # the build line links what the Makefile links
    build = re.search(r"// Build: +(nvcc .*)", src).group(1)
    assert ("-lcublasLt" in build) == cublaslt and not re.search(r"-lcublas\b", build)
    assert ("cublasLt" in files["Makefile"]) == cublaslt and "-lcublas " not in files["Makefile"]
    assert ("#include <cublasLt.h>" in src) == cublaslt
    assert ("cuBLASLt does the work" in src) == cublaslt
    assert not re.search(r"OpenMP|omp_get|gcc ", files["Makefile"] + src)
    kernels = render_kernels(specs.load("gpt2-124m"), precision, matmul)
    assert not PYTHON_INTERNALS.search(kernels)


def test_kernel_launch_shapes_carry_their_reasons():
    src = render(specs.load("gpt2-124m"), "cuda")["train_gpt2.cu"]
    defines = re.findall(r"^#define (BLOCK_SIZE|LN_ROWS_PER_BLOCK|REDUCE_ROWS|CLASSIFIER_BLOCK|NORM_BLOCKS|TILE|ATT_\w+)"
                         r" \d+ +// (.+)$", src, re.M)
    assert len(defines) == 8 and all(len(reason) > 20 for _, reason in defines)


def test_tables_are_expressions_with_one_labelled_entry_per_line():
    src = render(specs.load("gpt2-124m"))["train_gpt2.c"]
    sizes = src.split("param_sizes[NUM_PARAMETER_TENSORS] = {\n")[1].split("};")[0]
    assert re.search(r"\(size_t\)PADDED_VOCAB_SIZE \* CHANNELS, +// wte \(Vp,C\)", sizes)
    assert not re.search(r"^\s*\d+,", sizes, re.M)  # no bare numbers
    decay = src.split("param_decay[NUM_PARAMETER_TENSORS] = {\n")[1].split("};")[0].strip().splitlines()
    assert len(decay) == 16 and decay[0].split() == ["1,", "//", "wte"]
    assert re.search(r"0.0040824829f}, +// attprojw: 0.02 / sqrt\(2 \* NUM_LAYERS\)", src)
    assert max(len(line) for line in src.splitlines()) <= 160
    assert "\n\n\n" not in src and not re.search(r"[ \t]$", src, re.M)


def test_the_readmes_links_and_pictures_exist():
    """Every relative link or image in the README names a file of the repository; the report
    picture is a PNG of the size llmgen report writes."""
    root = EXAMPLES.parent.parent
    readme = (root / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", readme)
    assert "docs/report.png" in targets
    for target in targets:
        assert (root / target).exists(), f"README links to {target}, which is not there"
    png = (root / "docs" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1200, 900)
