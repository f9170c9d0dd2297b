"""Instructions of the split kernel's loops, from its machine code -- without a GPU.

The decode kernel's tile loop is bound by one warp's instruction issue (bench/gpu_notes.md,
session 15: ~3,000 instructions a 128-position tile at ~0.36 issued a cycle is the ~4 us a
tile the trace shows), so the count of instructions a tile executes is a proxy for its
time that any Linux x86-64 machine can read: the launch a decode layer makes is compiled
with NVRTC as MLX would (tests/turboquant/nvrtc.py) and disassembled with nvdisasm
(``pip install nvidia-cuda-nvdisasm``, test extras). Each loop (a backward branch) is
listed with its instructions and tensor-core ops; the tile loop's count per tile runs its
inner k-block loop ``D / 16`` times::

    python bench/sass_count.py                       # default layout, D 128, 32/8 heads
    python bench/sass_count.py --tune FOLD=False     # a setting against the default
    python bench/sass_count.py --aligned             # the 16-byte copy path alone
    python bench/sass_count.py --rope                # a model's step: new position, RoPE
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import tune_arg  # noqa: E402

_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s.*?(\.L_x_\d+)")
# the split kernel picks 16-byte copies at run time when its sources are aligned
_ALIGN_TEST = re.compile(r"const bool al16 = [^;]*;", re.S)


def nvdisasm() -> str | None:
    """nvdisasm on PATH, else the one pip installs (``nvidia/cu13/bin``)."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in spec.submodule_search_locations if spec else []:
        path = Path(base) / "cu13" / "bin" / "nvdisasm"
        if path.exists():
            return str(path)
    return None


@dataclasses.dataclass
class Loop:
    start: int
    end: int
    ops: collections.Counter  # opcode (without modifiers) -> instructions in the loop

    @property
    def size(self) -> int:
        return sum(self.ops.values())

    @property
    def mma(self) -> int:
        return self.ops["HMMA"]


def parse_loops(sass: str) -> list[Loop]:
    """Every loop of a disassembly: instructions from a backward branch's target to it."""
    ins, at, pending = [], {}, None
    for line in sass.splitlines():
        text = line.strip()
        m = _LABEL.match(text)
        if m:
            pending = m.group(1)
            continue
        m = _INS.search(text)
        if m:
            addr = int(m.group(1), 16)
            ins.append((addr, m.group(2)))
            if pending:
                at[pending], pending = addr, None
    loops = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if m and at.get(m.group(1), addr) < addr:
            lo = at[m.group(1)]
            ops = collections.Counter(
                re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                for a, t in ins
                if lo <= a <= addr
            )
            loops.append(Loop(lo, addr, ops))
    return loops


def tile_counts(loops: list[Loop], k_blocks: int, steps: int | None = None) -> dict:
    """The tile loop (the smallest loop holding the most tensor-core ops) and what a tile
    executes: its body once, its first inner loop with tensor-core ops (the score k-blocks)
    ``k_blocks`` times, a second (the value steps, COMPACT_VALUES) ``steps`` times."""
    most = max(loop.mma for loop in loops)
    tile = min((loop for loop in loops if loop.mma == most), key=lambda loop: loop.size)
    inner = sorted(
        (loop for loop in loops
         if tile.start <= loop.start and loop.end <= tile.end and loop is not tile and loop.mma),
        key=lambda loop: loop.start,
    )  # fmt: skip
    executed = tile.ops.copy()
    for i, loop in enumerate(inner):
        trips = k_blocks if i == 0 or steps is None else steps
        for op, n in loop.ops.items():
            executed[op] += (trips - 1) * n
    return {"static": tile.size, "inner": [loop.size for loop in inner],
            "executed": sum(executed.values()), "mma": executed["HMMA"], "ops": executed}  # fmt: skip


def split_sass(dim: int, q_heads: int, kv_heads: int, length: int, aligned: bool,
               rope: bool = False) -> str:  # fmt: skip
    """The disassembly of the split launch one decode layer makes (default layout);
    ``rope``: as a model's decode step makes it -- the new position written by the launch
    (the cache's TailAppend on CUDA), the query's and its RoPE applied there (Llama's:
    the whole head in halves, base 5e5)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from services.turboquant import TurboQuantConfig
    from services.turboquant.cache import JoinWorkspace
    from services.turboquant.kernels import fused_decode, mma_decode
    from services.turboquant.kernels.cases import cache_case
    from services.turboquant.rope_fusion import DeferringRope, PendingRope, rope_spec
    from tests.turboquant import nvrtc
    from tests.turboquant.test_kernels import _RecordedKernel

    saved = mx.fast.cuda_kernel, mma_decode._SPLIT_HEADER, fused_decode.cuda_available
    mx.fast.cuda_kernel = _RecordedKernel
    if aligned:
        mma_decode._SPLIT_HEADER = _ALIGN_TEST.sub("const bool al16 = true;", saved[1])
    if rope:  # (the cache then keeps its new position for the launch, as on CUDA)
        fused_decode.cuda_available = lambda: True
    _RecordedKernel.launches, _RecordedKernel.outputs = [], []
    try:
        mma_decode.clear_kernel_caches()
        case = cache_case(np.random.default_rng(0), TurboQuantConfig.recommended(), batch=1,
                          q_heads=q_heads, kv_heads=kv_heads, dim=dim, length=length,
                          steps=3 if rope else 2)  # fmt: skip
        keys = dataclasses.replace(case.keys, workspace=JoinWorkspace())
        q = case.queries.astype(mx.float16)
        if rope:
            inner = nn.RoPE(dim, traditional=False, base=500000.0)
            wrap, last = DeferringRope(inner, rope_spec(inner)), case.cache.offset - 1
            keys.append.k = PendingRope(keys.append.k, wrap, last)
            q = PendingRope(q, wrap, last)
        mma_decode.mma_decode_layer(q, keys, case.values, 0.1)
        kernel, inputs, template, *_ = _RecordedKernel.launches[0]
        assert not rope or template["RDIMS"] == dim  # (the kernel took the RoPE)
        dtypes = [o.dtype for o in _RecordedKernel.outputs[0]]
        cubin, log = nvrtc.compile_cubin(nvrtc.kernel_source(kernel, inputs, [], dtypes))
    finally:
        mx.fast.cuda_kernel, mma_decode._SPLIT_HEADER, fused_decode.cuda_available = saved
        mma_decode.clear_kernel_caches()
    if cubin is None:
        raise RuntimeError(log)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm(), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def main() -> None:
    from services.turboquant.kernels import mma_decode

    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", default="32/8", help="query/KV heads")
    ap.add_argument("--length", type=int, default=4000)
    ap.add_argument("--aligned", action="store_true", help="only the 16-byte copy path")
    ap.add_argument("--rope", action="store_true", help="a model's step: new position, RoPE")
    ap.add_argument("--tune", type=tune_arg, default={}, help="mma_decode tunables: FOLD=False,...")
    args = ap.parse_args()
    if nvdisasm() is None:
        sys.exit("needs nvdisasm: pip install 'nvidia-cuda-nvdisasm>=13,<14'")
    mma_decode.tune(**args.tune)
    hq, hkv = map(int, args.heads.split("/"))
    loops = parse_loops(split_sass(args.dim, hq, hkv, args.length, args.aligned, args.rope))
    for loop in loops:
        print(f"loop {loop.start:#07x}-{loop.end:#07x}  {loop.size:5d} instructions  "
              f"{loop.mma:3d} HMMA")  # fmt: skip
    t = tile_counts(
        loops, args.dim // 16, mma_decode.steps_for(mma_decode.KEY_LAYOUTS["channel"], args.dim)
    )
    print(f"tile loop: {t['static']} instructions (inner {t['inner']}); a tile executes "
          f"{t['executed']}, {t['mma']} of them HMMA")  # fmt: skip
    print("  " + ", ".join(f"{op} {n}" for op, n in t["ops"].most_common(16)))


if __name__ == "__main__":
    main()
