"""Custom CUDA kernels for MLX with as little host work per launch as MLX allows.

MLX 0.32's ``cuda_kernel`` rebuilds a launch's whole source (its header included) on every
call, formats each template argument into it and into the kernel's name, and hashes the
source again when it encodes the launch; with a 27 KB header that is paid on every decode
layer. So a kernel built here gets its header as one ``#include`` of a file holding it
(NVRTC reads the file once, when it compiles), and its template arguments written into
the body as the very lines MLX would write: a launch passes no template and only a short
source. The compiled code is the same (tests/turboquant/test_kernel_compile.py). Where no
private file can be written, the header goes inline as before.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx

# mlx/backend/cuda: dtype_to_cuda_type, for the dtypes a template argument can take here
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float",
              "uint32": "uint32_t", "int32": "int32_t", "uint8": "uint8_t"}  # fmt: skip


def cuda_type(dtype) -> str:
    return CUDA_TYPES[str(dtype).rsplit(".", 1)[-1]]


def digest(*texts: str) -> str:
    return hashlib.sha1("".join(texts).encode()).hexdigest()[:12]


def source_name(base: str, *texts: str) -> str:
    """``base`` plus a digest of the kernel's source: MLX keeps compiled kernels on disk
    (``MLX_PTX_CACHE_DIR``, else <tmp>/mlx/<version>/ptx) under the kernel's name and template
    arguments alone, so without it a changed kernel (a tqstack upgrade, a branch) would load
    the old build."""
    return f"{base}_{digest(*texts)}"


def include_dir() -> Path:
    """Where header files live: <tmp>/tqstack-<uid>/cuda, beside MLX's <tmp>/mlx/.../ptx."""
    return Path(tempfile.gettempdir()) / f"tqstack-{os.getuid()}" / "cuda"


def header_include(header: str) -> str:
    """``#include`` of a file holding ``header``, named by its digest; the header itself
    (MLX's own way, slower per call) where no such file can be written safely.

    The file is checked against ``header`` and (re)written if missing or different (a
    temp-file cleaner, another version): call this when a kernel is built, right before
    NVRTC compiles it. The directory must be ours and not writable by others, or another
    user could put code into our kernels.
    """
    path = include_dir() / f"tq_{digest(header)}.cuh"
    if '"' in str(path) or "\\" in str(path):
        return header  # not a path an #include can name
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.parent.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return header
        if not path.is_file() or path.read_text() != header:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(header)
            os.replace(tmp, path)  # atomic: a concurrent process reads a whole file or none
    except OSError:
        return header
    return f'#include "{path}"\n'


def template_lines(template) -> str:
    """The lines MLX writes at the top of a kernel body for ``template`` (custom_kernel.cpp,
    build_kernel), followed by its blank line."""
    out = []
    for name, value in template:
        if isinstance(value, bool):
            out.append(f"  constexpr bool {name} = {'true' if value else 'false'};\n")
        elif isinstance(value, int):
            out.append(f"  constexpr int {name} = {value};\n")
        else:
            out.append(f"  using {name} = {cuda_type(value)};\n")
    return "".join(out) + "\n" if out else ""


def absent_lines(absent, source: str) -> str:
    """Declarations standing in for the inputs and outputs a launch does not pass:
    ``absent`` holds ``(name, dtype, is_output)``; a null pointer each, and zero shapes and
    strides where ``source`` names them (the code reading them is compiled out)."""
    out = []
    for name, dtype, is_output in absent:
        out.append(f"  {'' if is_output else 'const '}{cuda_type(dtype)}* {name} = nullptr;\n")
        for part, kind in (("shape", "Shape"), ("strides", "Strides")):
            if f"{name}_{part}" in source:
                out.append(f"  const {kind} {name}_{part}{{}};\n")
    return "".join(out)


@lru_cache(maxsize=512)
def baked_kernel(name: str, inputs: tuple, outputs: tuple, source: str, header: str,
                 template: tuple, strided: bool, smem: int = 0, absent: tuple = ()):  # fmt: skip
    """An ``mx.fast.cuda_kernel`` with ``template`` written into its body and ``header``
    included from a file; launch it with no ``template``. ``strided``: inputs are read
    through their strides (MLX copies nothing); ``smem``: dynamic shared memory a block;
    ``absent``: ``(name, dtype, is_output)`` of what the source names but this plan never
    reads or writes, left out of the signature (MLX's host work grows with each argument)."""
    body = template_lines(template) + absent_lines(absent, source) + source
    return mx.fast.cuda_kernel(
        name=source_name(name, header, body),
        input_names=list(inputs),
        output_names=list(outputs),
        source=body,
        header=header_include(header),
        ensure_row_contiguous=not strided,
        shared_memory=smem,
    )
