"""One decode layer on a 128K-token default cache (32 q / 8 kv heads, D 128), for ncu.

    ncu --clock-control none -k regex:tq_mma -c 2 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python bench/kernel_profile.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import mlx.core as mx

    from services.turboquant import TurboQuantConfig, TurboQuantKVCache, install_patch
    from services.turboquant.attention import turboquant_attention

    install_patch()
    n, hkv, hq, d = 131072, 8, 32, 128
    k = mx.random.normal((1, hkv, n, d)).astype(mx.float16)
    v = mx.random.normal((1, hkv, n, d)).astype(mx.float16)
    q = mx.random.normal((1, hq, 1, d)).astype(mx.float16)
    ks, vs = TurboQuantKVCache(TurboQuantConfig.recommended()).update_and_fetch(k, v)
    for _ in range(2):
        mx.eval(turboquant_attention(q, ks, vs, 1 / math.sqrt(d)))
    print("ok", ks.n_body, ks.tail.shape)


if __name__ == "__main__":
    main()
