"""No CUDA kernel spills registers to local memory: every kernel of the kernels-only source
(render_kernels, the same kernels as the trainer's) is compiled with the trainer's flags for
sm_80 and sm_90 with ptxas -v, for gpt2-124m (heads of 64) and gpt2-124m with 6 heads (heads
of 128, the largest the tensor-core attention takes), in fp32 and bf16. The registers per
thread of each kernel are printed as a table (pytest -s shows it); the whole trainer's build
is checked the same way in test_cuda_emit.py.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmgen import spec as specs
from llmgen.emit import render_kernels

NVCC = shutil.which("nvcc") or (os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc")
needs_nvcc = pytest.mark.skipif(not os.access(NVCC, os.X_OK), reason="nvcc not found (no CUDA toolkit)")
ARCHS = ("80", "90")
SPECS = {"gpt2-124m": {}, "gpt2-124m, 6 heads of 128": {"heads": 6}}
# the trainer's NVCCFLAGS (make/cuda.mk), warnings as errors
FLAGS = ["-O3", "--use_fast_math", "--Werror", "all-warnings", "-Xptxas", "-v"]


def ptxas_report(output: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(kernel, 'sm_90'): {registers, stack, spill_stores, spill_loads}} from ptxas -v's output."""
    out, current = {}, None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            current = m.groups()
            out[current] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            out[current]["registers"] = int(m.group(1))
    return out


def kernel_names(src: str) -> set[str]:
    return set(re.findall(r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\(', src))


def compile_kernels(folder, name, overrides, precision):
    src = render_kernels(specs.load(name).with_overrides(**overrides), precision)
    folder.mkdir(parents=True)
    (folder / "kernels.cu").write_text(src)
    gencode = [x for a in ARCHS for x in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    result = subprocess.run([NVCC, "--fatbin", *FLAGS, *gencode, "kernels.cu", "-o", "kernels.fatbin"], cwd=folder,
                            capture_output=True, text=True)
    return src, result


def format_table(reports: dict) -> str:
    columns = [(case, precision, arch) for case in SPECS for precision in ("fp32", "bf16") for arch in ARCHS]
    kernels = sorted({k for report in reports.values() for k, _ in report})
    head = ["kernel"] + [f"{'HS128' if '128' in c else 'HS64'} {p} sm_{a}" for c, p, a in columns]
    rows = [head]
    for kernel in kernels:
        row = [kernel]
        for case, precision, arch in columns:
            entry = reports[(case, precision)].get((kernel, f"sm_{arch}"))
            row.append(str(entry["registers"]) if entry else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


@needs_nvcc
def test_no_kernel_spills_registers(tmp_path):
    cases = [(case, overrides, precision) for case, overrides in SPECS.items() for precision in ("fp32", "bf16")]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: compile_kernels(tmp_path / f"{c[0].split(',')[0]}-{len(c[1])}-{c[2]}",
                                                          c[0].split(",")[0], c[1], c[2]), cases))
    reports = {}
    for (case, overrides, precision), (src, result) in zip(cases, results):
        assert result.returncode == 0, result.stderr
        assert not [line for line in result.stderr.splitlines() if not line.startswith(("ptxas info", "    "))], \
            result.stderr  # nothing but ptxas's report: not one warning
        report = ptxas_report(result.stderr)
        names = kernel_names(src)
        assert {k for k, _ in report} == names and len(report) == len(names) * len(ARCHS), (case, precision)
        for (kernel, arch), entry in report.items():
            where = f"{kernel} ({case}, {precision}, {arch}): {entry}"
            assert entry["spill_stores"] == 0 and entry["spill_loads"] == 0, "spills: " + where
            assert entry["stack"] == 0, "local memory: " + where
            assert entry["registers"] <= 255, where
        reports[(case, precision)] = report
    print("\nregisters per thread, by kernel (no spills, no stack frame):\n" + format_table(reports))
