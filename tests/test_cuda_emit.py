"""The emitted CUDA trainer without a GPU: it is emitted for every preset, compiles and links
warning-free for sm_80 and sm_90 in fp32 and bf16, takes the C trainer's flags, and its
Makefile finds CUDA (a toolkit, nvcc on PATH, or pip's nvidia wheels) by itself."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmgen import spec as specs
from llmgen.emit import emit, render, render_kernels
from llmgen.fileio import write_shard

from conftest import llmgen

NVCC = shutil.which("nvcc") or (os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc")
needs_nvcc = pytest.mark.skipif(not os.access(NVCC, os.X_OK), reason="nvcc not found (no CUDA toolkit)")
# warnings are errors: the host compiler's and nvcc's own (cudafe, ptxas)
WERROR = "-O3 --use_fast_math -Xcompiler -Werror --Werror all-warnings"
COMMON_KERNELS = ["encoder_forward_kernel", "encoder_backward_wpe_kernel", "encoder_backward_wte_kernel",
                  "layernorm_forward_kernel", "layernorm_backward_kernel", "layernorm_param_grads_partial_kernel",
                  "bias_backward_partial_kernel", "column_sum_finish_kernel", "matmul_tiled_kernel",
                  "attention_backward_delta_kernel", "gelu_forward_kernel", "gelu_backward_kernel",
                  "residual_forward_kernel", "classifier_kernel", "adamw_kernel", "grad_norm_partial_kernel",
                  "matvec_forward_kernel", "kvcache_fill_kernel", "attention_decode_kernel",
                  "attention_decode_combine_kernel"]
SIMPLE_ATTENTION = ["attention_forward_kernel", "attention_backward_dq_kernel", "attention_backward_dkdv_kernel"]
FLASH_ATTENTION = ["flash_forward_kernel", "flash_backward_dq_kernel", "flash_backward_dkdv_kernel"]

# a kernel's definition; the tensor-core ones are __launch_bounds__(...) too
DEFINITION = r'extern "C" __global__ void (__launch_bounds__\([^)]*\)\s+)?{}\('


def kernels(spec, precision):
    """The kernels a variant has: the tensor-core attention in bf16 for head sizes 16, 32, ..., 128,
    the simple one otherwise."""
    flash = precision == "bf16" and spec.head_size % 16 == 0 and spec.head_size <= 128
    return COMMON_KERNELS + (FLASH_ATTENTION if flash else SIMPLE_ATTENTION) + (["float_to_floatX_kernel"] if
                                                                                precision == "bf16" else [])


def usage_lines(src: str) -> list[str]:
    """The lines of the usage text in an emitted main, but the default -t (64 on the CPU, the
    whole context on a GPU) and what the C trainer's MPI build adds (#ifdef USE_MPI)."""
    start = src.index('"usage: ./')
    text = src[start:src.index("exit(status);", start)]
    text = re.sub(r"^#ifdef USE_MPI\n.*?^#endif\n", "", text, flags=re.M | re.S)
    return re.sub(r"MAX_SEQ_LEN, \d+\);", "MAX_SEQ_LEN, DEFAULT_T);", text).splitlines()


@pytest.mark.parametrize("name", [n for n in specs.preset_names() if specs.load(n).is_gpt2])
def test_every_preset_emits_cuda(name):
    """(The CUDA trainer computes GPT-2's blocks; test_variants checks that it refuses others.)"""
    spec = specs.load(name)
    c_src = render(spec)["train_gpt2.c"]
    for precision in ("fp32", "bf16"):
        for matmul in ("cublaslt", "tiled"):
            files = render(spec, "cuda", precision, matmul)
            assert set(files) == {"train_gpt2.cu", "test_gpt2.cu", "Makefile"}
            src = files["train_gpt2.cu"]
            assert src == render(specs.load(name), "cuda", precision, matmul)["train_gpt2.cu"]  # deterministic
            assert f"#define HEAD_SIZE {spec.head_size} " in src and f"#define CHANNELS {spec.n_embd} " in src
            link = " -lcublasLt" if matmul == "cublaslt" else ""
            assert f"nvcc -O3 --use_fast_math -arch=native train_gpt2.cu{link} -o train_gpt2cu" in src
            mine = kernels(spec, precision)
            for kernel in mine:
                assert re.search(DEFINITION.format(kernel), src), kernel
            for kernel in SIMPLE_ATTENTION + FLASH_ATTENTION:  # only the attention kernels it uses
                assert (kernel + "(" in src) == (kernel in mine), kernel
            assert ("typedef __nv_bfloat16 floatX;" in src) == (precision == "bf16")
            assert ("cublasLtMatmul(" in src) == (matmul == "cublaslt")
            assert "preatt" not in src and "acts.probs" not in src  # no T x T matrix, no probabilities
            # the same flags and help as the C trainer, under its own name
            assert usage_lines(src) == [line.replace("./train_gpt2 ", "./train_gpt2cu ") for line in usage_lines(c_src)]


def test_kernels_render_alone():
    spec = specs.load("test-odd")
    src = render_kernels(spec, "bf16")
    assert "typedef __nv_bfloat16 floatX;" in src and "#define HEAD_SIZE 16 " in src
    assert "cudaCheck" not in src and "static void" not in src and "int main" not in src
    for kernel in kernels(spec, "bf16"):
        assert re.search(DEFINITION.format(kernel), src), kernel


def test_c_output_does_not_depend_on_cuda_options():
    spec = specs.load("test-odd")
    c = render(spec)
    both = render(spec, "all", "bf16", "tiled")
    assert render(spec, "c", "bf16", "tiled") == c
    assert both["train_gpt2.c"] == c["train_gpt2.c"] and both["test_gpt2.c"] == c["test_gpt2.c"]
    assert "train_gpt2cu" not in c["Makefile"] and "train_gpt2cu" in both["Makefile"]


def test_emit_command_targets(tmp_path):
    for target, files in [("c", ["Makefile", "bench_gpt2.c", "test_gpt2.c", "train_gpt2.c"]),
                          ("cuda", ["Makefile", "test_gpt2.cu", "train_gpt2.cu"]),
                          ("all", ["Makefile", "bench_gpt2.c", "test_gpt2.c", "test_gpt2.cu", "train_gpt2.c", "train_gpt2.cu"])]:
        out = tmp_path / target
        result = llmgen("emit", "--spec", "test-tiny", "--target", target, "--precision", "bf16", "-o", out)
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in out.iterdir()) == files
    bad = llmgen("emit", "--spec", "test-tiny", "--target", "gpu", "-o", tmp_path / "x")
    assert bad.returncode == 2 and "--target" in bad.stderr


def make(out: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *args], cwd=out, capture_output=True, text=True, env=env)


def build_cuda(tmp_path, name, precision, matmul, target="train_gpt2cu", arch="80 90"):
    out = tmp_path / f"{name}-{precision}-{matmul}"
    emit(specs.load(name), out, "cuda", precision, matmul)
    result = make(out, target, f"GPU_ARCH={arch}", f"NVCCFLAGS={WERROR}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # not one warning
    return out


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("matmul", ["cublaslt", "tiled"])
def test_compiles_without_warnings_for_sm80_and_sm90(tmp_path, precision, matmul):
    out = build_cuda(tmp_path, "test-odd", precision, matmul)
    command = make(out, "-n", "-B", "train_gpt2cu", "GPU_ARCH=80 90").stdout
    assert "-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90" in command
    # the flags are parsed before the GPU is touched; then, here, the missing GPU is named
    help_text = subprocess.run([str(out / "train_gpt2cu"), "-h"], capture_output=True, text=True)
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: ./train_gpt2cu [options]")
    for args, message in [(["-b", "x"], "-b: expected an integer"), (["-Z", "1"], "unknown flag -Z"),
                          (["-t", "1000"], "between 1 and max_seq_len 24"), (["-n", "5"], "checkpoints need an output dir")]:
        bad = subprocess.run([str(out / "train_gpt2cu"), *args], capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr


@needs_nvcc
@pytest.mark.slow
def test_gpt2_124m_bf16_and_its_harness_compile(tmp_path):
    """The production build (gpt2-124m, bf16, cuBLASLt) for sm_90, warning-free, with ptxas's
    report: no kernel of the whole trainer spills (tests/test_cuda_registers.py checks the
    kernels alone for both architectures and head sizes); the harness for sm_80."""
    from test_cuda_registers import kernel_names, ptxas_report
    out = tmp_path / "gpt2-124m"
    emit(specs.load("gpt2-124m"), out, "cuda", "bf16")
    result = make(out, "train_gpt2cu", "GPU_ARCH=90", f"NVCCFLAGS={WERROR} -Xptxas -v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [line for line in result.stderr.splitlines() if not line.startswith(("ptxas info", "    "))], result.stderr
    report = ptxas_report(result.stderr)
    assert {k for k, _ in report} == kernel_names((out / "train_gpt2.cu").read_text())
    spilled = {k: e for k, e in report.items() if e["spill_stores"] or e["spill_loads"] or e["stack"]}
    assert not spilled, spilled
    print("\nthe trainer's kernels, sm_90 registers per thread: " +
          ", ".join(f"{k} {e['registers']}" for (k, _), e in sorted(report.items())))
    result = make(out, "test_gpt2cu", "GPU_ARCH=80", f"NVCCFLAGS={WERROR}")
    assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr


@needs_nvcc
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kernels_alone_compile_as_pycuda_does(tmp_path, precision):
    """PyCUDA compiles a SourceModule with nvcc --cubin for the device's architecture."""
    (tmp_path / "kernels.cu").write_text(render_kernels(specs.load("test-odd"), precision))
    result = subprocess.run([NVCC, "--cubin", "-arch", "sm_90", "--Werror", "all-warnings", "kernels.cu"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    symbols = (tmp_path / "kernels.cubin").read_bytes().decode("latin-1")
    for kernel in kernels(specs.load("test-odd"), precision):  # extern "C": unmangled, so that PyCUDA's get_function finds them by name
        assert kernel + "\0" in symbols and not re.search(rf"_Z\d+{kernel}", symbols), kernel


@needs_nvcc
@pytest.mark.slow
def test_the_one_command_build(tmp_path):
    emit(specs.load("test-tiny"), tmp_path, "cuda", "bf16")
    result = subprocess.run([NVCC, "-O3", "--use_fast_math", "-arch=native", "train_gpt2.cu", "-lcublas", "-lcublasLt",
                             "-o", "train_gpt2cu"], cwd=tmp_path, capture_output=True, text=True)
    if "Cannot find valid GPU for '-arch=native'" in result.stderr:
        # no GPU here: nvcc falls back to its default architecture, older than sm_80, which
        # the program refuses in one line
        assert result.returncode != 0 and "this program needs a GPU of compute capability 8.0 or newer" in result.stderr
        result = subprocess.run([NVCC, "-O3", "--use_fast_math", "-arch=sm_80", "train_gpt2.cu", "-lcublasLt",
                                 "-o", "train_gpt2cu"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    run = subprocess.run(["./train_gpt2cu", "-x", "1"], cwd=tmp_path, capture_output=True, text=True)
    if run.returncode != 0:  # no GPU here: the first thing the program says is that
        assert run.stderr.startswith("error: no CUDA device: ") or "no token shard" in run.stderr, run.stderr


def cuda_env(**extra):
    """The environment less anything that points at CUDA."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = "/usr/bin:/bin"
    env.update(extra)
    return env


def cuda_info(out, env, *args):
    result = make(out, "cuda-info", *args, env=env)
    assert result.returncode == 0, result.stderr
    return dict(line.split(":", 1) for line in result.stdout.splitlines())


@needs_nvcc
def test_makefile_finds_cuda_home_then_nvcc_on_path(tmp_path):
    emit(specs.load("test-tiny"), tmp_path, "cuda")
    toolkit = Path(NVCC).resolve().parent.parent
    info = cuda_info(tmp_path, cuda_env(CUDA_HOME=str(toolkit)))
    assert info["nvcc"].strip() == f"{toolkit}/bin/nvcc" and info["link"].strip() == "-lcublasLt"
    info = cuda_info(tmp_path, cuda_env(PATH=f"{Path(NVCC).parent}:/usr/bin:/bin"))
    assert info["nvcc"].strip() == f"{toolkit}/bin/nvcc"  # the real folder above nvcc
    assert info["GPU_ARCH"].split() == ["80", "90"] or shutil.which("nvidia-smi")
    assert cuda_info(tmp_path, cuda_env(), "GPU_ARCH=90")["GPU_ARCH"].strip() == "90"
    missing = make(tmp_path, "train_gpt2cu", env=cuda_env())
    assert missing.returncode != 0 and "error: nvcc not found" in missing.stderr


@needs_nvcc
@pytest.mark.slow
def test_makefile_finds_pip_wheels_and_links_their_versioned_library(tmp_path):
    """A CUDA 13 wheel layout: nvidia/cu13/{bin,include,lib}, lib holding libcublasLt.so.13 only
    (made of links into the toolkit here: only what the Makefile looks at)."""
    toolkit = Path(NVCC).resolve().parent.parent
    real_lib = next(p for p in sorted((toolkit / "lib64").glob("libcublasLt.so.*")) if re.fullmatch(r"libcublasLt\.so\.\d+", p.name))
    wheels = tmp_path / "site" / "nvidia" / "cu13"
    for sub in ("bin", "include", "lib"):
        (wheels / sub).mkdir(parents=True)
    (wheels / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    for header in ("cublasLt.h", "cublas_api.h"):
        (wheels / "include" / header).symlink_to(toolkit / "include" / header)
    (wheels / "lib" / real_lib.name).symlink_to(real_lib)
    out = tmp_path / "out"
    emit(specs.load("test-tiny"), out, "cuda", "fp32")
    env = cuda_env(PYTHONPATH=str(tmp_path / "site"), PYTHON=sys.executable)
    info = cuda_info(out, env)
    assert info["nvcc"].strip() == f"{wheels}/bin/nvcc"
    assert info["cuBLAS"].strip() == str(wheels)
    assert f"-l:{real_lib.name}" in info["link"] and f"-rpath={wheels}/lib" in info["link"]
    # nvcc works only from a complete toolkit: build with the real one, and the wheels' cuBLASLt
    result = make(out, "train_gpt2cu", "GPU_ARCH=80", f"NVCC={toolkit}/bin/nvcc", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    dynamic = subprocess.run(["readelf", "-d", str(out / "train_gpt2cu")], capture_output=True, text=True).stdout
    assert f"[{real_lib.name}]" in dynamic and f"{wheels}/lib" in dynamic


def test_tf32_is_an_emit_choice_for_fp32_cublaslt_and_verify_builds_without(tmp_path, monkeypatch):
    from llmgen import verify as v
    from llmgen.emit import cuda_build
    spec = specs.load("test-odd")
    default = render(spec, "cuda", "fp32")["train_gpt2.cu"]
    assert "#define CUBLAS_COMPUTE CUBLAS_COMPUTE_32F_FAST_TF32" in default
    assert "this file was generated with --tf32, the default" in default and "cuBLASLt TF32 matmuls" in default
    with cuda_build(tf32=False):
        exact = render(spec, "cuda", "fp32")["train_gpt2.cu"]
    assert "#define CUBLAS_COMPUTE CUBLAS_COMPUTE_32F\n" in exact and "FAST_TF32" not in exact
    assert "this file was generated with --no-tf32" in exact and "cuBLASLt fp32 matmuls" in exact
    for other in (render(spec, "cuda", "bf16")["train_gpt2.cu"], render(spec, "cuda", "fp32", "tiled")["train_gpt2.cu"]):
        assert not re.search("tf32", other, re.I)  # no fp32 cuBLASLt matmuls: nothing to choose
    # the command line, and verify's build (make is not run here)
    out = tmp_path / "cli"
    assert llmgen("emit", "--spec", "test-odd", "--target", "cuda", "--no-tf32", "-o", out).returncode == 0
    assert (out / "train_gpt2.cu").read_text() == exact
    monkeypatch.setattr(v, "make", lambda out_dir, target, *args: out_dir / target)
    v.build_cuda(spec, tmp_path / "verify", "fp32", "cublaslt")
    assert (tmp_path / "verify" / "train_gpt2.cu").read_text() == exact
    assert render(spec, "cuda", "fp32")["train_gpt2.cu"] == default  # the choice lasted only as long as the build


def test_recompute_gelu_keeps_one_layer_of_gelu_output():
    from llmgen.emit import cuda_build
    spec = specs.load("gpt2-124m")
    with cuda_build(recompute_gelu=True):
        src = render(spec, "cuda", "bf16")["train_gpt2.cu"]
    plain = render(spec, "cuda", "bf16")["train_gpt2.cu"]
    assert "(size_t)B * T * 4 * CHANNELS * sizeof(floatX), \"the activation fch_gelu\"" in src
    assert "(size_t)NUM_LAYERS * B * T * 4 * CHANNELS * sizeof(floatX), \"the activation fch_gelu\"" in plain
    assert src.count("gelu_forward(a.fch_gelu, la.fch, BT * 4 * C);") == 1 and "gelu_forward(a.fch_gelu" not in plain
    assert "--recompute-gelu" in src and "--recompute-gelu" not in plain


NCCL_HEADER = Path(NVCC).resolve().parent.parent / "include" / "nccl.h"


@needs_nvcc
@pytest.mark.skipif(shutil.which("mpicc") is None or shutil.which("mpirun") is None, reason="needs Open MPI's mpicc and mpirun")
@pytest.mark.skipif(not NCCL_HEADER.exists() and not Path("/usr/include/nccl.h").exists(), reason="NCCL not found")
def test_make_nccl_builds_and_links_with_mpi_and_nccl(tmp_path):
    """make nccl: the trainer with -DUSE_MPI, warning-free, linked to libnccl and libmpi; on a
    machine without a GPU, 2 ranks stop with rank 0's error, and -h stops both cleanly."""
    emit(specs.load("test-tiny"), tmp_path, "cuda", "bf16")
    build = make(tmp_path, "nccl", "GPU_ARCH=80", f"NVCCFLAGS={WERROR}")
    assert build.returncode == 0, build.stderr
    libs = subprocess.run(["ldd", str(tmp_path / "train_gpt2cu")], capture_output=True, text=True).stdout
    assert "libnccl" in libs and "libmpi" in libs
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2", "./train_gpt2cu"]
    help = subprocess.run(mpirun + ["-h"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert help.returncode == 0 and "Built with MPI and NCCL: mpirun -np N ./train_gpt2cu" in help.stdout, help.stderr
    if not shutil.which("nvidia-smi"):
        write_shard(tmp_path / "tokens.bin", [1, 2, 3] * 1000)
        run = subprocess.run(mpirun + ["-i", "tokens.bin", "-x", "1"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
        errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        assert run.returncode != 0 and len(errors) == 1 and errors[0].startswith("error: no CUDA device"), run.stderr
        assert errors[0].endswith("(rank 0 of 2)")
