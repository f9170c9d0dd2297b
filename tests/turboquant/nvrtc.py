"""Compile a custom kernel launch as MLX's CUDA backend would, with NVRTC from PyPI.

On a machine without a GPU, a kernel that does not compile (a template parameter the
source uses but the launch does not pass, a typo in the header) otherwise only shows on
the GPU machine. This assembles the same source MLX 0.32's ``cuda_kernel`` builds
(``mlx/backend/cuda/custom_kernel.cpp``: its default header, the header, a
``__global__`` signature from the inputs' dtypes, the template constants, the body),
compiles it for sm_90a with NVRTC 13 (``nvidia-cuda-nvrtc`` and the CUDA headers from
PyPI, test extras) and reads the cubin's registers and static shared memory. MLX's own
JIT header is replaced by nvrtc_include/ (only the Shape / Strides types our kernels use).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

from services.turboquant.kernels.jit import cuda_type, template_lines

STUB_INCLUDE = Path(__file__).resolve().parent / "nvrtc_include"
DEFAULT_HEADER = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
)


def _cuda_root() -> Path | None:
    """``nvidia/cu13`` of the pip-installed CUDA 13 packages, if NVRTC is among them."""
    spec = importlib.util.find_spec("nvidia")
    for base in spec.submodule_search_locations if spec else []:
        root = Path(base) / "cu13"
        if (root / "lib" / "libnvrtc.so.13").exists() and (root / "include" / "cccl").exists():
            return root
    return None


def available() -> bool:
    return _cuda_root() is not None


@cache
def _nvrtc():
    return ctypes.CDLL(str(_cuda_root() / "lib" / "libnvrtc.so.13"))


def _ctype(dtype) -> str:
    return cuda_type(dtype)


def kernel_source(kernel, inputs, template, output_dtypes) -> str:
    """The source MLX builds for one launch of ``kernel`` (a recorded ``cuda_kernel``)."""
    src = DEFAULT_HEADER + kernel.header
    src += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += f"__global__ void custom_kernel_{kernel.name}(\n"
    for name, arr in zip(kernel.input_names, inputs, strict=True):
        src += f"    const {_ctype(arr.dtype)}* {name},\n"
        if arr.ndim > 0:
            if name + "_shape" in kernel.source:
                src += f"    const __grid_constant__ Shape {name}_shape,\n"
            if name + "_strides" in kernel.source:
                src += f"    const __grid_constant__ Strides {name}_strides,\n"
    outs = [
        f"    {_ctype(t)}* {n}" for n, t in zip(kernel.output_names, output_dtypes, strict=True)
    ]
    src += ",\n".join(outs) + ") {\n"
    src += template_lines(template)
    return src + kernel.source + "\n}\n\n} // namespace mlx::core::cu\n"


def compile_cubin(source: str, arch: str = "sm_90a") -> tuple[bytes | None, str]:
    """``(cubin, log)``; cubin None when NVRTC rejects the source."""
    lib, root = _nvrtc(), _cuda_root()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"k.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [b"--device-as-default-execution-space", f"--gpu-architecture={arch}".encode(),
            f"--include-path={STUB_INCLUDE}".encode(), f"--include-path={root}/include".encode(),
            f"--include-path={root}/include/cccl".encode()]  # fmt: skip
    try:
        ok = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) == 0
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if not ok:
            return None, log.value.decode(errors="replace")
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_many(sources: list[str], arch: str = "sm_90a") -> list[tuple[bytes | None, str]]:
    """:func:`compile_cubin` of each source, on every core (ctypes lets go of the GIL while
    NVRTC compiles): the compile tests are the longest part of the suite."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda src: compile_cubin(src, arch), sources))


def _sections(cubin: bytes):
    """``(name, offset, size)`` of each section of a cubin (ELF64)."""
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)
    ]
    names = sections[shstrndx][4]
    for sec in sections:
        start = names + sec[0]
        yield cubin[start : cubin.index(b"\0", start)], sec[4], sec[5]


def machine_code(cubin: bytes) -> bytes:
    """The kernels' machine code: every ``.text.*`` section (named after the kernel, so two
    builds of one kernel under two names compare equal)."""
    return b"".join(
        cubin[o : o + n] for name, o, n in _sections(cubin) if name.startswith(b".text.")
    )


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """``(registers a thread, static shared bytes a block)`` of a one-kernel cubin: the
    EIATTR_REGCOUNT attribute (0x2f) of ``.nv.info`` and the ``.nv.shared.*`` sizes."""
    regs, smem = 0, 0
    for name, pos, size in _sections(cubin):
        if name.startswith(b".nv.shared."):
            smem += size
        if name != b".nv.info":
            continue
        end = pos + size
        while pos < end:  # records: format byte, attribute byte, then a value
            fmt, attr = cubin[pos], cubin[pos + 1]
            if fmt == 4:  # size-prefixed value
                (size,) = struct.unpack_from("<H", cubin, pos + 2)
                if attr == 0x2F:  # (function index, registers)
                    regs = max(regs, struct.unpack_from("<I", cubin, pos + 8)[0])
                pos += 4 + size
            else:
                pos += 4 if fmt in (2, 3) else 2
    return regs, smem
