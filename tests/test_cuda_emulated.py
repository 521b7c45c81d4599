"""The PyCUDA kernel tests (tests/test_cuda_kernels.py), run without a GPU on a CPU emulator
of the CUDA execution model, so that the kernels' logic is checked here too: indexing,
masking, the online softmax, every __syncthreads, warp shuffle and tensor-core fragment.

The emulator is a small stand-in `pycuda` package, written to a temporary folder and put
first on the path of a pytest run of test_cuda_kernels.py:
- SourceModule compiles the kernels-only source (render_kernels) with g++ as C++, each CUDA
  thread a coroutine (ucontext): a block's threads run one at a time, each until it waits at
  a __syncthreads or a warp-wide operation, in a different order each round, so that a
  missing barrier shows as a wrong result; a barrier some threads never reach is reported as
  a deadlock. `__shared__` variables are static: blocks run one after another.
- The warp-wide operations are emulated from the PTX ISA's definitions: __shfl_xor_sync,
  mma.sync.m16n8k16 (bf16 inputs, fp32 sums, the documented fragment layout) and
  ldmatrix.x2.trans; the kernels' two inline-PTX wrappers (mma_m16n8k16, ldmatrix_x2_trans) are
  replaced by calls into the emulator. Any other inline PTX fails the compile.
- gpuarray arrays are NumPy arrays in host memory; their addresses are the kernels' pointers.
What the emulator cannot show: speed, real races between warps (they run one at a time),
the hardware's rounding inside mma and --use_fast_math's approximations.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("g++")
NVCC = shutil.which("nvcc")
CUDA_INCLUDE = Path(NVCC).resolve().parent.parent / "include" if NVCC else None
needs_cxx = pytest.mark.skipif(CXX is None or CUDA_INCLUDE is None or not (CUDA_INCLUDE / "cuda_bf16.h").exists(),
                               reason="needs g++ and the CUDA headers (cuda_bf16.h)")

EMULATOR_H = r"""
// A CPU emulator of the CUDA execution model, enough for llmgen's kernels (see
// tests/test_cuda_emulated.py). Each thread of a block is a ucontext coroutine.
#include <cuda_bf16.h>
#include <vector_functions.h>
#include <ucontext.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <functional>
#include <map>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
using std::max;
using std::min;
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

namespace emu {
// Switching between coroutines: on x86-64 a few instructions that save the callee-saved
// registers on the stack and swap stack pointers (ucontext's swapcontext makes a system call
// each time, which would make the emulator ten times slower); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch(void** from, void* to);
asm(".text\n.globl emu_switch\n.hidden emu_switch\n.type emu_switch,@function\nemu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n");
struct Context { void* sp; };
static void context_switch(Context* from, Context* to) { emu_switch(&from->sp, to->sp); }
static void context_make(Context* c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = NULL;            // entry's return address: it never returns
    *--sp = (void*)entry;    // where emu_switch's ret goes
    for (int i = 0; i < 6; i++) { *--sp = NULL; }  // rbp rbx r12 r13 r14 r15
    c->sp = sp;
}
#else
struct Context { ucontext_t uc; };
static void context_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
static void context_make(Context* c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = NULL;
    makecontext(&c->uc, entry, 0);
}
#endif

struct Thread {
    Context ctx;
    uint3 tid;
    int linear, warp, lane, done;
    char* stack;
};
static Thread* threads;
static int n_threads, live;
static Thread* current;
static Context scheduler;
static int progress;
static dim3 grid_dim, block_dim;
static uint3 block_idx;
static const std::function<void()>* body;
static const size_t STACK = 256 * 1024;

static void fail(const char* what) {
    fprintf(stderr, "cuda emulator: %s (block %u,%u,%u thread %d)\n", what, block_idx.x, block_idx.y, block_idx.z,
            current ? current->linear : -1);
    fflush(stderr);
    abort();
}

static void yield() { context_switch(&current->ctx, &scheduler); }

// __syncthreads: every thread of the block that has not exited arrives, then all go on.
static int barrier_arrived, barrier_generation;
static void syncthreads() {
    int generation = barrier_generation;
    progress = 1;
    if (++barrier_arrived == live) {
        barrier_arrived = 0;
        barrier_generation++;
        return;
    }
    while (barrier_generation == generation) { yield(); }
}

// A warp-wide exchange among the lanes of mask: each gives `bytes` bytes and, once all of
// them have, gets everyone's (all[lane]). Per mask and lane a sequence number counts the
// exchanges; two slots per lane (by its parity) let a lane run one exchange ahead.
struct MaskState {
    int seq[32];
    unsigned char data[2][32][128];
};
static std::map<std::pair<int, unsigned>, MaskState> exchanges;  // (warp, mask)
static void exchange(unsigned mask, const void* mine, size_t bytes, void* all) {
    int lane = current->lane;
    if (!(mask >> lane & 1u)) { fail("a warp-wide operation by a lane not in its mask"); }
    if (bytes > 128) { fail("exchange too large"); }
    MaskState& st = exchanges[std::make_pair(current->warp, mask)];
    int s = st.seq[lane];
    memcpy(st.data[s & 1][lane], mine, bytes);
    st.seq[lane] = s + 1;
    progress = 1;
    for (;;) {
        int ready = 1;
        for (int l = 0; l < 32; l++) {
            if ((mask >> l & 1u) && st.seq[l] < s + 1) { ready = 0; }
        }
        if (ready) { break; }
        yield();
    }
    for (int l = 0; l < 32; l++) {
        if (mask >> l & 1u) { memcpy((unsigned char*)all + l * bytes, st.data[s & 1][l], bytes); }
    }
}

template <class T> static T shfl_xor(unsigned mask, T value, int lane_mask) {
    T all[32];
    exchange(mask, &value, sizeof(T), all);
    int from = current->lane ^ lane_mask;
    if (from > 31 || !(mask >> from & 1u)) { fail("__shfl_xor_sync from a lane not in the mask"); }
    return all[from];
}

static float bf16_at(uint32_t pair, int half) {
    uint32_t bits = (pair >> (16 * half) & 0xffffu) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, from the PTX ISA's fragment layout
// (section "Matrix Fragments for mma.m16n8k16 with floating point type").
static void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    struct Frag { uint32_t a[4], b[2]; float d[4]; } mine, all[32];
    memcpy(mine.a, a, sizeof(mine.a));
    memcpy(mine.b, b, sizeof(mine.b));
    memcpy(mine.d, d, sizeof(mine.d));
    exchange(0xffffffffu, &mine, sizeof(mine), all);
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        int g = l / 4, c = l % 4;
        for (int e = 0; e < 2; e++) {
            A[g][2 * c + e] = bf16_at(all[l].a[0], e);
            A[g + 8][2 * c + e] = bf16_at(all[l].a[1], e);
            A[g][2 * c + 8 + e] = bf16_at(all[l].a[2], e);
            A[g + 8][2 * c + 8 + e] = bf16_at(all[l].a[3], e);
            B[2 * c + e][g] = bf16_at(all[l].b[0], e);
            B[2 * c + 8 + e][g] = bf16_at(all[l].b[1], e);
            C[g][2 * c + e] = all[l].d[e];
            C[g + 8][2 * c + e] = all[l].d[2 + e];
        }
    }
    int g = current->lane / 4, c = current->lane % 4;
    int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * c, 2 * c + 1, 2 * c, 2 * c + 1};
    for (int i = 0; i < 4; i++) {
        float sum = C[rows[i]][cols[i]];
        for (int k = 0; k < 16; k++) { sum += A[rows[i]][k] * B[k][cols[i]]; }
        d[i] = sum;
    }
}

// ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16: lanes 0-7 give the rows of matrix 0,
// lanes 8-15 those of matrix 1 (8 b16 each); transposed, lane 4g + c gets rows 2c and
// 2c + 1 of column g of each matrix (the lower row in the low half).
static void ldmatrix_x2_trans(uint32_t r[2], const void* row) {
    const void* rows[32];
    exchange(0xffffffffu, &row, sizeof(row), rows);
    int g = current->lane / 4, c = current->lane % 4;
    for (int m = 0; m < 2; m++) {
        uint16_t lo, hi;
        memcpy(&lo, (const uint16_t*)rows[8 * m + 2 * c] + g, 2);
        memcpy(&hi, (const uint16_t*)rows[8 * m + 2 * c + 1] + g, 2);
        r[m] = (uint32_t)lo | (uint32_t)hi << 16;
    }
}

static void trampoline() {
    (*body)();
    current->done = 1;
    live--;
    progress = 1;
    if (barrier_arrived > 0 && barrier_arrived == live) {  // the threads left wait at a barrier
        barrier_arrived = 0;
        barrier_generation++;
    }
    context_switch(&current->ctx, &scheduler);  // for good: a finished thread is not resumed
}

static void launch(dim3 grid, dim3 block, const std::function<void()>& fn) {
    int n = block.x * block.y * block.z;
    if (n > 1024 || n <= 0) { fail("bad block size"); }
    grid_dim = grid;
    block_dim = block;
    body = &fn;
    static std::vector<Thread> pool;
    if ((int)pool.size() < n) {
        size_t old = pool.size();
        pool.resize(n);
        for (size_t i = old; i < pool.size(); i++) { pool[i].stack = (char*)malloc(STACK); }
    }
    threads = pool.data();
    n_threads = n;
    unsigned round_seed = 12345;
    for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
    for (unsigned bx = 0; bx < grid.x; bx++) {
        block_idx = make_uint3(bx, by, bz);
        exchanges.clear();
        barrier_arrived = 0;
        live = n;
        for (int i = 0; i < n; i++) {
            Thread& t = threads[i];
            t.linear = i;
            t.tid = make_uint3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
            t.warp = i / 32;
            t.lane = i % 32;
            t.done = 0;
            context_make(&t.ctx, t.stack, STACK, trampoline);
        }
        std::vector<int> order(n);
        for (int i = 0; i < n; i++) { order[i] = i; }
        while (live > 0) {
            progress = 0;
            // a different order each round: forward, backward, then shuffled
            round_seed = round_seed * 1103515245u + 12345u;
            if (round_seed % 3 == 1) { std::reverse(order.begin(), order.end()); }
            else if (round_seed % 3 == 2) {
                for (int i = n - 1; i > 0; i--) {
                    round_seed = round_seed * 1103515245u + 12345u;
                    std::swap(order[i], order[(round_seed >> 8) % (i + 1)]);
                }
            }
            for (int k = 0; k < n; k++) {
                Thread& t = threads[order[k]];
                if (t.done) { continue; }
                current = &t;
                context_switch(&scheduler, &t.ctx);
            }
            current = NULL;
            if (!progress) { fail("deadlock: threads wait at a barrier or warp operation others never reach"); }
        }
    }
}
}  // namespace emu

#define threadIdx (emu::current->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) emu::shfl_xor((mask), (value), (lane_mask))
"""

# The kernels' inline-PTX helpers, replaced by the emulator's (same signatures).
REPLACEMENTS = {
    "mma_m16n8k16": "__device__ inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]) "
                    "{ emu::mma_m16n8k16_bf16(d, a, b); }",
    "ldmatrix_x2_trans": "__device__ inline void ldmatrix_x2_trans(uint32_t r[2], const floatX* row) "
                         "{ emu::ldmatrix_x2_trans(r, row); }",
}

PYCUDA = {
    "__init__.py": '"""A CPU emulator standing in for PyCUDA (see tests/test_cuda_emulated.py)."""\nEMULATED = True\n',
    "autoinit.py": "from . import driver  # noqa: F401\ncontext = None\n",
    "driver.py": '''
import ctypes


class Error(Exception):
    pass


class Device:
    def __init__(self, n):
        self.n = n

    def name(self):
        return "CUDA emulator on the CPU"

    def compute_capability(self):
        return (9, 0)


def memset_d8(ptr, value, nbytes):
    ctypes.memset(int(ptr), value, nbytes)
''',
    "gpuarray.py": '''
import numpy as np


class GPUArray:
    """A "device" array: a NumPy array in host memory; gpudata is its address."""

    def __init__(self, array):
        self.array = array

    @property
    def gpudata(self):
        return self.array.ctypes.data

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)
    nbytes = property(lambda self: self.array.nbytes)
    size = property(lambda self: self.array.size)

    def get(self):
        return self.array.copy()


def to_gpu(a):
    return GPUArray(np.array(a, copy=True, order="C"))


def empty(shape, dtype):
    return GPUArray(np.empty(shape, dtype))
''',
    "compiler.py": '''
import ctypes
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPLACEMENTS = {replacements!r}
CTYPES = {{"int": ctypes.c_int, "unsigned": ctypes.c_uint, "unsigned int": ctypes.c_uint, "size_t": ctypes.c_size_t,
          "float": ctypes.c_float, "double": ctypes.c_double}}


def _emulated(src):
    for name, replacement in REPLACEMENTS.items():
        pattern = re.compile(r"^__device__ inline void " + name + r"\\(.*?^\\}}$", re.S | re.M)
        src, n = pattern.subn(replacement, src)
        if n > 1:
            raise RuntimeError(f"emulator: {{n}} definitions of {{name}}")
    code = re.sub(r"//[^\\n]*", "", src)
    if re.search(r"\\basm\\b", code):
        raise RuntimeError("emulator: inline PTX it does not know (only " + ", ".join(REPLACEMENTS) + ")")
    return src


def _kernels(src):
    """(name, [(type, name)]) of every extern "C" __global__ function."""
    code = re.sub(r"//[^\\n]*", "", src)
    out = []
    for m in re.finditer(r'extern "C" __global__ void\\s+(?:__launch_bounds__\\([^)]*\\)\\s*)?(\\w+)\\s*\\(([^)]*)\\)\\s*\\{{',
                         code):
        params = []
        for p in " ".join(m.group(2).split()).split(","):
            p = p.strip()
            name = re.search(r"(\\w+)$", p).group(1)
            params.append((p[:-len(name)].strip(), name))
        out.append((m.group(1), params))
    return out


class Function:
    def __init__(self, lib, name, params):
        self.fn = getattr(lib, "emu_launch_" + name)
        self.name, self.params = name, params

    def __call__(self, *args, block=(1, 1, 1), grid=(1, 1)):
        if len(args) != len(self.params):
            raise TypeError(f"{{self.name}}: {{len(args)}} arguments for {{len(self.params)}} parameters")
        values = []
        for arg, (ctype, pname) in zip(args, self.params):
            if "*" in ctype:
                address = arg.gpudata if hasattr(arg, "gpudata") else int(arg)
                values.append(ctypes.c_void_p(address))
            else:
                kind = CTYPES[ctype.replace("const ", "")]
                if isinstance(arg, np.generic) and arg.dtype.itemsize != ctypes.sizeof(kind):
                    raise TypeError(f"{{self.name}}: {{pname}} is {{ctype}}, given {{arg.dtype}}")
                values.append(kind(arg.item() if isinstance(arg, np.generic) else arg))
        pointers = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                              for v in values])
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        self.fn(*[ctypes.c_uint(x) for x in grid + block], pointers)


class SourceModule:
    def __init__(self, source, no_extern_c=False, options=None, **kwargs):
        src = _emulated(source)
        kernels = _kernels(src)
        wrappers = []
        for name, params in kernels:
            lines = [f'extern "C" __attribute__((visibility("default"))) void emu_launch_{{name}}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                     'unsigned by, unsigned bz, void** args) {{']
            for i, (ctype, pname) in enumerate(params):
                lines.append(f"    {{ctype}} a{{i}}; memcpy((void*)&a{{i}}, args[{{i}}], sizeof(a{{i}}));")
            call = ", ".join(f"a{{i}}" for i in range(len(params)))
            lines.append(f"    std::function<void()> fn = [&] {{{{ {{name}}({{call}}); }}}};")
            lines.append("    emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), fn);")
            lines.append("}}")
            wrappers.append("\\n".join(lines))
        full = '#include "emulator.h"\\n' + src + "\\n" + "\\n".join(wrappers) + "\\n"
        key = hashlib.sha256((full + (HERE / "emulator.h").read_text()).encode()).hexdigest()[:16]
        build = Path(os.environ.get("CUDA_EMULATOR_BUILD", HERE / "build"))
        build.mkdir(parents=True, exist_ok=True)
        lib = build / f"kernels-{{key}}.so"
        if not lib.exists():
            cu = build / f"kernels-{{key}}.cpp"
            cu.write_text(full)
            cmd = [os.environ.get("CXX", "g++"), "-O1", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w",
                   "-I" + str(HERE), "-I" + os.environ["CUDA_EMULATOR_INCLUDE"], str(cu), "-o", str(lib) + ".tmp"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError("emulator: g++ failed:\\n" + result.stderr[-4000:])
            os.replace(str(lib) + ".tmp", lib)
        self.lib = ctypes.CDLL(str(lib))
        self.kernels = dict(kernels)

    def get_function(self, name):
        if name not in self.kernels:
            raise KeyError(name)
        return Function(self.lib, name, self.kernels[name])
'''.format(replacements=REPLACEMENTS),
}


def write_emulator(folder: Path) -> Path:
    """The stand-in pycuda package in folder/pycuda; returns folder (for PYTHONPATH)."""
    pkg = folder / "pycuda"
    pkg.mkdir(parents=True, exist_ok=True)
    for name, text in PYCUDA.items():
        (pkg / name).write_text(textwrap.dedent(text).lstrip())
    (pkg / "emulator.h").write_text(EMULATOR_H)
    return folder


MUTATION_PLUGIN = """
import json, os
import llmgen.emit

_original = llmgen.emit.render_kernels


def _mutated(*args, **kwargs):
    src = _original(*args, **kwargs)
    for old, new in json.loads(os.environ["CUDA_EMULATOR_MUTATION"]):
        src = src.replace(old, new)
    return src


llmgen.emit.render_kernels = _mutated
"""


def run_kernel_tests(tmp_path, *selection, mutation=None, timeout=900):
    """pytest tests/test_cuda_kernels.py on the emulator; mutation: (old, new) text changes
    to the kernels' source, made by a plugin that wraps render_kernels."""
    site = write_emulator(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT / 'tests'}",
               CUDA_EMULATOR_INCLUDE=str(CUDA_INCLUDE), CUDA_EMULATOR_BUILD=str(tmp_path / "build"))
    plugin = []
    if mutation:
        (site / "emulator_mutation.py").write_text(MUTATION_PLUGIN)
        env["CUDA_EMULATOR_MUTATION"] = json.dumps(mutation)
        plugin = ["-p", "emulator_mutation"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *plugin,
           str(ROOT / "tests" / "test_cuda_kernels.py"), *selection]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def outcome(result) -> dict[str, int]:
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}


@needs_cxx
def test_kernel_tests_pass_on_the_emulator(tmp_path):
    """Every kernel test but those of the skips themselves (which check the real PyCUDA's
    skips), on the emulator."""
    result = run_kernel_tests(tmp_path, "-k", "not skips_with_the_reason")
    counts = outcome(result)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0 and counts.get("failed", 0) == 0, report
    skipped = re.findall(r"SKIPPED \[\d+\] (.*)", result.stdout)
    assert all("fp32 has no conversion kernel" in s for s in skipped), report  # nothing else may skip
    assert counts.get("passed", 0) >= 40, report


# Mistakes the emulator must catch, in the bf16 tensor-core kernels: a test that cannot fail
# would prove nothing.
MUTATIONS = {
    "no barrier after the forward's tile loads": [
        ("flash_load(v_tile, qkv_b + 2 * C, 3 * C, k0, FLASH_BK, T);\n        __syncthreads();",
         "flash_load(v_tile, qkv_b + 2 * C, 3 * C, k0, FLASH_BK, T);")],
    "two registers of an a fragment swapped": [
        ("a[1] = pair_at(x + (g + 8) * stride + 2 * c);\n    a[2] = pair_at(x + g * stride + 2 * c + 8);",
         "a[2] = pair_at(x + (g + 8) * stride + 2 * c);\n    a[1] = pair_at(x + g * stride + 2 * c + 8);")],
    "ldmatrix given the rows of 8 lanes only": [
        ("ldmatrix_x2_trans(b, x + threadIdx.x % 16 * stride);", "ldmatrix_x2_trans(b, x + threadIdx.x % 8 * stride);")],
    "the dq pass's causal mask off by one": [
        ("float p = key <= query ? exp2f(s[j][e] * scale2 - lse2[e / 2]) : 0.0f;",
         "float p = key < query ? exp2f(s[j][e] * scale2 - lse2[e / 2]) : 0.0f;")],
}


# The same for the generation kernels, each with the one test that must fail.
DECODE_MUTATIONS = {
    "no barrier after the attention over the cache loads q": ("test_attention_decode and 300-64-bf16", [
        ("    __syncthreads();\n    float m = -INFINITY;", "    float m = -INFINITY;")]),
    "a chunk's keys off by one": ("test_attention_decode and 300-64-bf16", [
        ("const floatX* k = k_rh + (size_t)(first + j) * HEAD_SIZE;",
         "const floatX* k = k_rh + (size_t)(first + j + 1) * HEAD_SIZE;")]),
    "the chunks combined without their weights": ("test_attention_decode and 300-64-bf16", [
        ("l += w * chunk[1];", "l += chunk[1];")]),
    "the new key not written to the cache": ("test_attention_decode and 17-64-bf16", [
        ("if (blockIdx.x == gridDim.x - 1) {  // the chunk of position t", "if (blockIdx.x == gridDim.x) {")]),
    "the matrix-vector product's second pass over the rows skipped": ("test_matvec_forward_long_rows and 64-bf16", [
        ("for (int r0 = 0; r0 < R; r0 += MATVEC_ROWS) {", "for (int r0 = 0; r0 < MATVEC_ROWS; r0 += MATVEC_ROWS) {")]),
}
CASES = {**{what: ("test_attention_head_sizes and 300-64-bf16", m) for what, m in MUTATIONS.items()},
         **DECODE_MUTATIONS}


@needs_cxx
@pytest.mark.parametrize("what", sorted(CASES))
def test_the_emulator_catches(tmp_path, what):
    from llmgen import spec as specs
    from llmgen.emit import render_kernels
    src = render_kernels(specs.load("test-odd").with_overrides(channels=128, heads=2, max_seq_len=320), "bf16")
    selection, mutation = CASES[what]
    for old, new in mutation:
        assert src.count(old) == 1, (what, old)  # the mutation still applies to today's kernels
    result = run_kernel_tests(tmp_path, "-k", selection, mutation=mutation)
    assert outcome(result).get("failed") == 1, result.stdout[-3000:] + result.stderr[-2000:]
