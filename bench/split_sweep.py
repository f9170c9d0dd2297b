"""Decode-layer time on the GPU against the split kernel's grid: the block order (a 1-D
grid with every split before the full-precision chunks, or splits and chunks per row) and
the number of splits. One run, the same caches for every variant:

    python bench/split_sweep.py [--contexts 4033,32705,131009] [--out DIR]
    python bench/split_sweep.py --contexts 32705 --warps 4,8 --splits 8,11,16   # block width

32 query / 8 KV heads, D 128, the default cache (contexts 63 short of a power of two leave
a full-precision tail of 64 positions, the average in decode); calls independent (the
GPU's time, not the host's). Each cache layer has its join workspace, as on CUDA: the
layer is one launch where the dispatch fuses the join (up to 64K), else two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import tune_arg  # noqa: E402

SPLITS = {4033: [4, 6, 8], 16321: [8, 12, 16, 24, 33], 32705: [12, 16, 20, 24, 33, 49],
          131009: [33, 44, 49, 64, 98, 132, 196]}  # fmt: skip


def main() -> None:
    import mlx.core as mx

    from bench.attention_gpu import bench_time, cache_sides, input_sets, kv_cache_slices
    from services.turboquant import TurboQuantConfig
    from services.turboquant.cache import JoinWorkspace
    from services.turboquant.kernels import mma_decode

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4033,16321,32705,131009")
    ap.add_argument(
        "--sets",
        type=int,
        default=0,
        help="input sets the calls rotate over (0: attention_gpu.input_sets)",
    )
    ap.add_argument(
        "--warps", default="4", help="warps a block (mma_decode.WARPS), comma-separated"
    )
    ap.add_argument("--splits", default="", help="split counts to force at every context")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tune", type=tune_arg, default={}, help="mma_decode tunables: WARPS=8,...")
    args = ap.parse_args()
    if args.tune:
        mma_decode.tune(**args.tune)
    hkv, hq, d = 8, 32, 128
    scale = 1 / math.sqrt(d)
    rows = []
    for n in [int(c) for c in args.contexts.split(",")]:
        sets = []
        for _ in range(args.sets or input_sets(2 * hkv * n * d * 2)):
            k, v = kv_cache_slices(hkv, n, d)
            ks, vs = cache_sides(k, v, TurboQuantConfig.recommended())
            ks = dataclasses.replace(ks, workspace=JoinWorkspace())
            q = mx.random.normal((1, hq, 1, d)).astype(mx.float16)
            mx.eval(q, *[a for a in ks.parts + vs.parts], ks.tail, vs.tail)
            sets.append((q, ks, vs))
        forced = [int(x) for x in args.splits.split(",") if x] or SPLITS.get(n, [])
        variants = [(4, False, None)] + [
            (w, True, s) for w in map(int, args.warps.split(",")) for s in [None, *forced]
        ]
        for warps, linear, splits in variants:
            if warps != mma_decode.WARPS:
                mma_decode.tune(WARPS=warps)  # (and forgets the plans and memos)
            mma_decode.LINEAR_GRID = linear

            def call(i, splits=splits, sets=sets):
                q, ks, vs = sets[i]
                return mma_decode.mma_decode_layer(q, ks, vs, scale, splits=splits)

            t = bench_time([lambda i=i: call(i) for i in range(len(sets))], reps=100)
            q, ks, vs = sets[0]  # the split count the plan chose (a shape; nothing runs)
            s = mma_decode._split(q, ks.rotation, ks, vs, scale, splits, False)[0].shape[2]
            rows.append({"context": n, "warps": warps, "linear": linear, "splits": s,
                         "rule": splits is None, "us": t * 1e6})  # fmt: skip
            print(f"n {n:6d}  warps {warps}  {'1-D grid' if linear else 'rows grid':9s}  splits {s:4d}"
                  f"{' (rule)' if splits is None else '       '}  {t * 1e6:7.1f} us", flush=True)  # fmt: skip
    mma_decode.LINEAR_GRID, mma_decode.WARPS = True, 4
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "split_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
