"""One decode layer on a default cache (32 q / 8 kv heads, D 128) and fp16 SDPA over the
same keys and values, for ncu (kernel durations, stalls):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python bench/kernel_profile.py --n 4096

Only the measured calls run inside a profiler range (cuProfilerStart/Stop), so ncu lists
every kernel of one decode layer (ours, then fp16) and none of the set-up.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import tune_arg  # noqa: E402


def main() -> None:
    import mlx.core as mx

    from bench.attention_gpu import cache_sides, kv_cache_slices
    from services.turboquant import TurboQuantConfig
    from services.turboquant.attention import turboquant_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=131072, help="context length")
    ap.add_argument("--fresh", action="store_true", help="head/tail re-made by a GPU op")
    ap.add_argument("--splits", type=int, help="force the split count")
    ap.add_argument("--rows-grid", action="store_true", help="the (splits, rows, batch) grid")
    ap.add_argument("--d-major-scales", action="store_true", help="key scales (B, H, D, T/g)")
    ap.add_argument("--layout", choices=["default", "affine", "codebook"], default="default",
                    help="the cache layout (attention_gpu's 'ours ...' variants)")  # fmt: skip
    ap.add_argument(
        "--tune", type=tune_arg, default={}, help="mma_decode tunables: COMPACT_VALUES=True,..."
    )
    args = ap.parse_args()
    from services.turboquant.kernels import mma_decode

    mma_decode.tune(**{"LINEAR_GRID": not args.rows_grid, **args.tune})
    n = args.n
    hkv, hq, d = 8, 32, 128
    k, v = kv_cache_slices(hkv, n, d)
    q = mx.random.normal((1, hq, 1, d)).astype(mx.float16)
    config = {
        "default": TurboQuantConfig.recommended(),
        "affine": TurboQuantConfig(),
        "codebook": TurboQuantConfig(quantizer="codebook"),
    }[args.layout]
    # --d-major-scales: the layout before session 9 (and Metal's); else the cache's choice
    ks, vs = cache_sides(k, v, config, False if args.d_major_scales else None)
    if args.fresh:
        import dataclasses

        ks = dataclasses.replace(ks, head=ks.head + 0, tail=ks.tail + 0)
        vs = dataclasses.replace(vs, head=vs.head + 0, tail=vs.tail + 0)
        mx.eval(ks.head, ks.tail, vs.head, vs.tail)
    print("tail", ks.tail.shape, ks.tail.dtype, "head", ks.head.shape)
    cuda = ctypes.CDLL("libcuda.so.1")
    for i in range(3):
        if i == 2:
            mx.synchronize()
            cuda.cuProfilerStart()
        if args.splits:
            mx.eval(mma_decode.mma_decode_layer(q, ks, vs, 1 / math.sqrt(d), splits=args.splits))
        else:
            mx.eval(turboquant_attention(q, ks, vs, 1 / math.sqrt(d)))
        mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d)))
    mx.synchronize()
    cuda.cuProfilerStop()
    print("ok", ks.n_body, ks.tail.shape)


if __name__ == "__main__":
    main()
