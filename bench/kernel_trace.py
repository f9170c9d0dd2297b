"""Where a fused decode launch spends its time: every block's timeline on the GPU.

The split kernel built with ``TQM_TRACE`` (mma_decode.TRACE_AT) has each block record,
in the layer's workspace, when it starts, when the query is rotated, when warp 0's first
tile has landed, when each warp leaves its tile loop, when the block's merge is written,
when it has counted itself done, when its fp chunk is done, and when it ends (the row's
last block: after its join). One decode layer, 32 query / 8 KV heads, D 128, the default
cache; on the GPU machine:

    python bench/kernel_trace.py --contexts 4033,16321,32705,131009 --out $OUT

prints per context: the launch's span, the stages' spread over the split blocks, and the
rows' last blocks (the join). ``--between tlb|l2|both|kernel`` runs traffic like a model's
other kernels before each lone launch (``traffic``): which of them makes the loads wait as
long as inside a model (bench/gpu_notes.md, session 24). Times: globaltimer (ns, one clock
for every SM) for when, clock64 for how long within a block. The marks cost a few registers (the trace build's
code is not the product's; its durations are a guide, not the benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import pct, tune_arg  # noqa: E402

TRACE_AT = 1 << 22  # floats past the counters: beyond any partials these shapes need
SLOTS = 32  # uint64 a block: 16 globaltimer marks, then the same 16 as clock64
MARKS = {0: "start", 2: "query rotated", 3: "first tile in", 8: "merge written",
         9: "fp chunk done", 10: "counted", 11: "end", 12: "query loaded",
         13: "join: loads start", 14: "join: partials merged"}  # fmt: skip
WARP_END = 4  # marks 4..7: warp w left its tile loop
TRACE_FLOATS = TRACE_AT + 4096 * SLOTS * 2  # a workspace with room for 4096 blocks' records
SM_MHZ = 1980.0  # the H200's SM clock under load, for clock64 durations (--mhz)


def read_trace(work) -> list[dict]:
    """The blocks of the last traced launch that wrote ``work`` (a JoinWorkspace of at
    least TRACE_FLOATS), decoded; [] if none has."""
    import numpy as np

    from services.turboquant.cache import JOIN_COUNTER_ROWS

    raw = np.array(work.array[JOIN_COUNTER_ROWS + TRACE_AT :]).view(np.uint64)
    starts = np.nonzero(raw[::SLOTS])[0]
    return decode(raw, int(starts.max()) + 1) if len(starts) else []


def decode(raw, grid: int) -> list[dict]:
    """Blocks' records (``raw``: uint64 array, SLOTS a block) as dicts of ns since the
    launch's first start (globaltimer) and cycles since the block's own start (clock64)."""
    blocks = []
    t_first = min(int(raw[b * SLOTS]) for b in range(grid))
    for b in range(grid):
        r = [int(x) for x in raw[b * SLOTS : (b + 1) * SLOTS]]
        info = r[1]
        g = {i: r[i] - t_first for i in range(16) if i != 1 and r[i]}
        c = {i: r[16 + i] - r[16] for i in range(16) if i != 1 and r[i]}
        blocks.append(dict(block=b, sm=info >> 32, idx=(info >> 16) & 0xFFFF, row=info & 0xFFFF,
                           ns=g, cycles=c))  # fmt: skip
    return blocks


def warp_ends(b: dict, key: str) -> list[int]:
    """When each warp of block ``b`` left its tile loop (``key``: "ns" or "cycles")."""
    return [b[key][WARP_END + w] for w in range(4) if WARP_END + w in b[key]]


def summary(blocks: list[dict], mhz: float) -> list[str]:
    """Lines: the span, then each stage (p10 / p50 / p90 / max over split blocks, us since the
    launch's first start), the fp blocks, the rows' last blocks."""
    us = 1e-3
    split = [b for b in blocks if WARP_END in b["ns"]]
    fp = [b for b in blocks if 9 in b["ns"]]
    rows = {}
    for b in blocks:  # a row's last block counts last and joins: it ends last
        if b["row"] not in rows or b["ns"][11] > rows[b["row"]]["ns"][11]:
            rows[b["row"]] = b
    last = list(rows.values())
    end = max(b["ns"][11] for b in blocks)
    lines = [f"span {end * us:6.1f} us, {len(split)} split blocks, {len(fp)} fp blocks, "
             f"{len({b['sm'] for b in blocks})} SMs"]  # fmt: skip

    def row(name, xs):
        p = [pct(xs, q) if xs else float("nan") for q in (0.1, 0.5, 0.9, 1.0)]
        lines.append(
            f"  {name:28s} p10 {p[0]:6.1f}  p50 {p[1]:6.1f}  p90 {p[2]:6.1f}  max {p[3]:6.1f}"
        )

    for i in (0, 2, 3):
        row(f"{MARKS[i]} (us)", [b["ns"][i] * us for b in split if i in b["ns"]])
    row("last warp out of loop (us)", [max(warp_ends(b, "ns")) * us for b in split])
    row("first warp out of loop (us)", [min(warp_ends(b, "ns")) * us for b in split])
    for i in (8, 10, 11):
        row(f"{MARKS[i]} (us)", [b["ns"][i] * us for b in split if i in b["ns"]])
    cyc = lambda b, i, j: (b["cycles"][j] - b["cycles"][i]) / mhz  # noqa: E731 - us
    row("block: rotate (us, clock)", [cyc(b, 0, 2) for b in split])
    if any(12 in b["cycles"] for b in split):  # (builds since session 24)
        row("  query loads (us, clock)", [cyc(b, 0, 12) for b in split if 12 in b["cycles"]])
    row("block: 1st tile wait (us, clock)", [cyc(b, 2, 3) for b in split if 3 in b["cycles"]])
    row("block: tiles (us, clock)",
        [(max(warp_ends(b, "cycles")) - b["cycles"][2]) / mhz for b in split])  # fmt: skip
    row("block: merge (us, clock)",
        [(b["cycles"][8] - max(warp_ends(b, "cycles"))) / mhz for b in split])  # fmt: skip
    row("block: count (us, clock)", [cyc(b, 8, 10) for b in split])
    if fp:
        row("fp blocks: done (us)", [b["ns"][9] * us for b in fp])
        row("fp blocks: end (us)", [b["ns"][11] * us for b in fp])
    if last:
        row("last blocks: counted (us)", [b["ns"][10] * us for b in last])
        row("last blocks: join (us, clock)", [cyc(b, 10, 11) for b in last])
        for name, i, j in (("fence", 10, 13), ("partials", 13, 14), ("rotate, out", 14, 11)):
            xs = [cyc(b, i, j) for b in last if i in b["cycles"] and j in b["cycles"]]
            if xs:
                row(f"  join: {name} (us, clock)", xs)
        row("last blocks: end (us)", [b["ns"][11] * us for b in last])
    per_sm = {}
    for b in blocks:
        per_sm.setdefault(b["sm"], []).append(b)
    busy = [max(x["ns"][11] for x in bs) - min(x["ns"][0] for x in bs) for bs in per_sm.values()]
    row("SM busy span (us)", [x * us for x in busy])
    row("blocks an SM", [len(bs) for bs in per_sm.values()])
    return lines


BETWEEN = ("none", "kernel", "l2", "tlb", "both")


def tlb_shape(tlb_gb: float, stride_kb: int) -> tuple[int, int]:
    """The ``tlb`` traffic's buffer as rows of one stride: MLX's dimensions are int32, and
    16 GB of floats in one dimension is not."""
    step = stride_kb * 1024 // 4
    return int(tlb_gb * 2**30) // 4 // step, step


def traffic(mode: str, l2_mb: float = 200, tlb_gb: float = 16, stride_kb: int = 2048):
    """What runs between traced launches, as a model's other kernels would: ``kernel`` one
    tiny op (another kernel between, nothing moved), ``l2`` a copy of ``l2_mb`` MB (evicts the
    L2 through few pages), ``tlb`` one float every ``stride_kb`` KB over ``tlb_gb`` GB (every
    page of a weights-sized buffer, hardly any L2), ``both``. Returns a callable giving
    the arrays to evaluate before a launch; None for ``none``."""
    import mlx.core as mx

    if mode not in BETWEEN:
        raise ValueError(f"--between: one of {', '.join(BETWEEN)}")
    if mode == "none":
        return None
    tiny = mx.zeros((256,), dtype=mx.float32)
    l2 = mx.zeros((int(l2_mb * 2**20) // 4,), dtype=mx.float32) if mode in ("l2", "both") else None
    big = mx.ones(tlb_shape(tlb_gb, stride_kb)) if mode in ("tlb", "both") else None
    mx.eval(*(a for a in (tiny, l2, big) if a is not None))

    def run() -> list:
        out = [tiny + 1]
        if l2 is not None:
            out.append(l2 + 1)  # reads and writes l2_mb: the L2's 50 MB evicted
        if big is not None:
            out.append(mx.sum(big[:, 0]))  # one float a stride: a TLB entry each
        return out

    return run


def main() -> None:
    import mlx.core as mx

    from bench.attention_gpu import cache_sides, input_sets, kv_cache_slices
    from services.turboquant import TurboQuantConfig
    from services.turboquant.cache import JoinWorkspace
    from services.turboquant.kernels import mma_decode

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4033,16321,32705,131009")
    ap.add_argument(
        "--splits", default="", help="comma-separated split counts to force (with the rule's)"
    )
    ap.add_argument("--mhz", type=float, default=SM_MHZ, help="SM clock for clock64 durations")
    ap.add_argument("--tune", type=tune_arg, default={}, help="mma_decode tunables: WARPS=8,...")
    ap.add_argument("--between", default="none", choices=BETWEEN,
                    help="traffic before each 'alone' launch (traffic()): which of the model's "
                    "effects slows the loads")  # fmt: skip
    ap.add_argument("--out")
    args = ap.parse_args()
    between = traffic(args.between)
    mma_decode.TRACE_AT = TRACE_AT  # (read when a kernel is built: tune clears them)
    mma_decode.tune(**{"FUSED_JOIN": True, "FUSED_MAX_WORK": None, **args.tune})
    hkv, hq, d = 8, 32, 128
    results = []
    for n in [int(c) for c in args.contexts.split(",")]:
        sets = []
        for _ in range(input_sets(2 * hkv * n * d * 2)):  # none of them in the L2, as in a model
            k, v = kv_cache_slices(hkv, n, d)
            ks, vs = cache_sides(k, v, TurboQuantConfig.recommended())
            work = JoinWorkspace(TRACE_FLOATS)
            ks = dataclasses.replace(ks, workspace=work)
            q = mx.random.normal((1, hq, 1, d)).astype(mx.float16)
            mx.eval(q, *ks.parts, *vs.parts)
            sets.append((q, ks, vs, work))
        for splits in [None] + [int(s) for s in args.splits.split(",") if s]:
            for kind in ("chained", "alone"):
                reps = 12 if kind == "chained" else 1
                for i in range(reps + 2):  # (the first two: compile, warm-up)
                    q, ks, vs, work = sets[i % len(sets)]
                    if kind == "alone" and between is not None:
                        mx.eval(*between())  # done before the launch starts
                    o = mma_decode.mma_decode_layer(q, ks, vs, 1 / math.sqrt(d), splits=splits)
                    if kind == "alone" or i < 2:
                        mx.eval(o)
                mx.eval(o)
                mx.synchronize()
                blocks = read_trace(work)
                grid = len(blocks)
                after = f" after {args.between}" if kind == "alone" and between else ""
                head = f"== n {n} splits {splits or 'rule'} {kind}{after}: grid {grid}"
                lines = [head] + summary(blocks, args.mhz)
                print("\n".join(lines), flush=True)
                results.append(dict(n=n, splits=splits, kind=kind, grid=grid, blocks=blocks,
                                    between=args.between if kind == "alone" else "none"))  # fmt: skip
                for *_, w in sets:  # no stale records (each set has its own workspace)
                    w.array = mx.zeros_like(w.array)
                    w.decode_memo = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernel_trace.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
