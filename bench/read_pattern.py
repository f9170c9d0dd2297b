"""How fast the GPU reads a decode layer's 4-bit keys and values in the order the split kernel
reads them, with the keys stored as the cache stores them now (per channel, transposed:
a tile's 128 positions are 64 bytes in each of 128 channel rows, rows a whole context
apart) and as 8 KB tiles (a tile's channels next to each other). Only loads, no math:

    python bench/read_pattern.py [--n 131072] [--splits 33,49] [--out DIR]

Grid and tile order as the split kernel's (blocks = splits x KV heads, 4 warps a block, a
block's tiles contiguous and dealt to its warps in turn), every lane's 32 loads of a tile
issued before any is used. If the strided rows read well below the tiled ones, the key
layout -- not the kernel's math -- holds the split kernel at half the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# MODE 0: keys as stored now (row d of head h: N/2 bytes); MODE 1: tiled (tile i of head h:
# 128 rows of 64 bytes). Values: one 64-byte row per position, either way.
SOURCE = r"""
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int h = blockIdx.y, S = gridDim.x, split = blockIdx.x;
  const int n_tiles = N / 128;
  const int per = (n_tiles + S - 1) / S;
  const int t0 = split * per, t1 = min(n_tiles, t0 + per);
  const uint4* kb = reinterpret_cast<const uint4*>(keys) + (size_t)h * (N * 4);  // 16-byte units
  const uint4* vb = reinterpret_cast<const uint4*>(vals) + (size_t)h * (N * 4);
  uint4 acc = make_uint4(0u, 0u, 0u, 0u);
  for (int i = t0 + warp; i < t1; i += nwarps) {
    uint4 x[32];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int row = lane / 4 + 8 * k, c = lane % 4;
      const size_t off = MODE == 0 ? (size_t)row * (N / 32) + (size_t)i * 4 + c
                                   : (size_t)i * 512 + row * 4 + c;
      x[k] = kb[off];
      x[16 + k] = vb[(size_t)i * 512 + 32 * k + lane];
    }
#pragma unroll
    for (int k = 0; k < 32; ++k) {
      acc.x ^= x[k].x; acc.y ^= x[k].y; acc.z ^= x[k].z; acc.w ^= x[k].w;
    }
  }
  out[(blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x] = acc.x ^ acc.y ^ acc.z ^ acc.w;
"""


def run(n: int, splits: list[int], heads: int = 8, d: int = 128, calls: int = 40) -> list[dict]:
    import mlx.core as mx

    from services.turboquant.kernels.jit import source_name

    assert d == 128, "the tile shape above is D 128's"
    kernel = mx.fast.cuda_kernel(
        name=source_name("tq_read_pattern", SOURCE),
        input_names=["keys", "vals"],
        output_names=["out"],
        source=SOURCE,
    )
    words = heads * n * d // 8  # 4 bits an element
    keys = mx.random.randint(0, 2**31, (words,)).astype(mx.uint32)
    vals = mx.random.randint(0, 2**31, (words,)).astype(mx.uint32)
    mx.eval(keys, vals)
    total = 2 * words * 4
    rows = []
    for s in splits:
        for mode, name in (
            (0, "keys per channel (rows N/2 bytes apart)"),
            (1, "keys in 8 KB tiles"),
        ):

            def launch(mode=mode, s=s):
                return kernel(
                    inputs=[keys, vals],
                    template=[("MODE", mode), ("N", n)],
                    grid=(s * 128, heads, 1),
                    threadgroup=(128, 1, 1),
                    output_shapes=[(s * heads * 128,)],
                    output_dtypes=[mx.uint32],
                )[0]

            mx.eval(launch())
            mx.synchronize()
            per_call = []
            for _ in range(5):
                t0 = time.perf_counter()
                mx.eval([launch() for _ in range(calls)])
                mx.synchronize()
                per_call.append((time.perf_counter() - t0) / calls)
            t = statistics.median(per_call)
            rows.append(
                {"splits": s, "blocks": s * heads, "layout": name, "us": t * 1e6,
                 "MB": total / 1e6, "GBps": total / t / 1e9}
            )  # fmt: skip
            print(f"splits {s:3d} blocks {s * heads:4d}  {name:42s} {t * 1e6:7.1f} us  "
                  f"{total / t / 1e9:6.0f} GB/s", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--splits", default="33,49,66")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = run(args.n, [int(s) for s in args.splits.split(",")])
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "read_pattern.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
