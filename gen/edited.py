"""A copy of an emitted trainer that the user edited: `llmgen verify --trainer FILE` compares
it with the reference and `llmgen train --trainer FILE` trains with it.

The emitted file holds its spec in its header (emit.SPEC_MARKER, then the TOML lines), so an
edited copy says which model it trains. Before it is built, its sizes (the #defines the
harness and the checkpoints depend on) are checked against the file emitted for that spec,
and a build that fails is reported as the compiler's first error, placed in the user's file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from . import emit as emitter
from . import spec as specs
from .enums import Matmul, Target
from .errors import LlmgenError
from .fileio import read_regular
from .spec import Spec

# The #defines of the sizes that the harness, the checkpoints and the comparison depend on:
# an edited trainer must keep those of the spec in its header.
SIZE_DEFINES = ("NUM_LAYERS", "NUM_HEADS", "CHANNELS", "HEAD_SIZE", "VOCAB_SIZE", "PADDED_VOCAB_SIZE",
                "MAX_SEQ_LEN", "KV_HEADS", "QKV_CHANNELS", "MLP_HIDDEN", "ROPE_THETA", "NUM_PARAMETER_TENSORS",
                "NUM_PARAMETERS", "NUM_ACTIVATION_TENSORS")
DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)[ \t]+([^\s/]+)", re.M)
HEADER_LINES = 200  # the spec is in the file's opening comment
COMPILER_ERROR = re.compile(r"^(?P<file>[^\s:()]+)(?::(?P<line>\d+)(?::(?P<col>\d+))?:|\((?P<nvline>\d+)\):)"
                            r" (?:fatal )?error: (?P<msg>.*)$", re.M)


def read(path: Path) -> str:
    try:
        return read_regular(path, "trainer").decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlmgenError(f"{path}: not a C or CUDA source file (not UTF-8 text: {e.reason} at byte {e.start})") \
            from None


def target_of(path: Path) -> Target:
    """C for a .c file, CUDA for a .cu file."""
    if path.suffix == ".c":
        return Target.C
    if path.suffix == ".cu":
        return Target.CUDA
    raise LlmgenError(f"{path}: expected a train_gpt2.c (C) or train_gpt2.cu (CUDA) file, by its suffix")


def spec_in_header(path: Path, text: str) -> Spec | None:
    """The spec an emitted trainer holds in its header, None if the file has no such block."""
    lines = text.splitlines()[:HEADER_LINES]
    marker = f"// {emitter.SPEC_MARKER}"
    if marker not in lines:
        return None
    toml_lines = []
    for line in lines[lines.index(marker) + 1:]:
        if not line.startswith("//   "):
            break
        toml_lines.append(line[5:])
    source = f"{path} (the spec in its header)"
    try:
        raw = tomllib.loads("\n".join(toml_lines))
    except tomllib.TOMLDecodeError as e:
        raise LlmgenError(f"{source}: not valid TOML ({e})") from None
    return specs.from_dict(raw, source)


def spec_of(path: Path, given: Spec | None) -> Spec:
    """The spec of an edited trainer: the one in its header, or `given` (--spec), which must
    agree with it."""
    header = spec_in_header(path, read(path))
    if header is None and given is None:
        raise LlmgenError(f"{path}: no spec in its header (the line '// {emitter.SPEC_MARKER}' and the TOML after "
                          "it, as llmgen emit writes them): give the spec it was generated from with --spec")
    if header is not None and given is not None and specs.differences(header, given):
        raise LlmgenError(f"{path}: the spec in its header differs from --spec ({specs.differences(header, given)}): "
                          "leave --spec out to use the header's")
    return header if header is not None else given


def cuda_build_of(path: Path) -> tuple[str, str] | None:
    """(precision, matmul) as the header of an emitted train_gpt2.cu gives them, or None."""
    m = re.search(r"^// Precision: (fp32|bf16)\. Matmuls: (cuBLASLt|a tiled shared-memory kernel)\.", read(path), re.M)
    if m is None:
        return None
    return m.group(1), Matmul.CUBLASLT.value if m.group(2) == "cuBLASLt" else Matmul.TILED.value


def check_sizes(path: Path, text: str, emitted: str) -> None:
    """The edited trainer must #define the spec's sizes as the emitted file does."""
    want = {name: value for name, value in DEFINE.findall(emitted) if name in SIZE_DEFINES}
    have: dict[str, tuple[str, int]] = {}
    for m in DEFINE.finditer(text):
        if m.group(1) in want and m.group(1) not in have:
            have[m.group(1)] = (m.group(2), text.count("\n", 0, m.start()) + 1)
    for name, value in want.items():
        if name not in have:
            raise LlmgenError(f"{path}: no #define {name} (the spec gives {value}): the harness and the "
                              "checkpoints need the sizes of the spec in its header")
        if have[name][0] != value:
            raise LlmgenError(f"{path}:{have[name][1]}: #define {name} {have[name][0]}, but the spec in its header "
                              f"gives {value}: to change the sizes, change the spec and emit again")


def install(path: Path, dest: Path) -> None:
    """Put the edited trainer where the build expects it (dest, a file just emitted for its
    spec), after checking its sizes against that file."""
    text = read(path)
    check_sizes(path, text, dest.read_text())
    dest.write_text(text)


def first_compiler_error(output: str, path: Path, build_dir: Path) -> str:
    """The compiler's first error, placed in the user's file when it is in the trainer."""
    m = COMPILER_ERROR.search(output)
    undefined = re.search(r"undefined reference to [`'](\w+)'", output)
    if m is None and undefined:
        return (f"the test harness calls {undefined.group(1)}, which {path} no longer defines (the harness "
                "reads the trainer through its TESTING functions)")
    if m is None:
        lines = [line for line in output.splitlines() if "error" in line]
        return lines[0].strip() if lines else output.strip().splitlines()[-1] if output.strip() else "no output"
    line = m.group("line") or m.group("nvline")
    where = f":{line}" + (f":{m.group('col')}" if m.group("col") else "")
    name = Path(m.group("file")).name
    if name in ("train_gpt2.c", "train_gpt2.cu"):
        return f"{path}{where}: error: {m.group('msg')}"
    return f"{build_dir / name}{where} (the test harness): error: {m.group('msg')}"


def make(out_dir: Path, target: str, path: Path, cc: str = "gcc", variables: dict | None = None) -> Path:
    """Build `target` in out_dir around the installed copy of `path`, always anew; a failed
    build is one line: the compiler's first error."""
    (out_dir / target).unlink(missing_ok=True)
    try:
        return emitter.make(out_dir, target, cc, variables)
    except LlmgenError as e:
        what = "with the test harness" if target.startswith("test_") else ""
        raise LlmgenError(f"{path} does not compile{' ' + what if what else ''}: "
                          f"{first_compiler_error(str(e), path, out_dir)}") from None
