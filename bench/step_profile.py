"""Where a decode step's GPU time goes: every kernel of whole decode steps, timed by ncu,
fp16 KV cache against ours (the same random-weight model as bench/e2e_decode_gpu.py).

The end-to-end benches time steps on a shared host, so their ratio mixes the GPU with the
host (fp16's step waits on its host at 32K batch 1). The kernels' summed durations are the
step's GPU time alone: their ratio is the most a cache could gain where both are GPU-bound.
On the GPU machine, one process a cache, each under ncu (``gpu_session.sh step-prof``):

    ncu --profile-from-start off --clock-control none --cache-control none \
        --metrics gpu__time_duration.sum --csv --page raw --log-file $OUT/fp16.csv \
        python3 bench/step_profile.py --cache fp16 --context 32768 --out $OUT

and ``--report DIR`` (here or there) prints the table; ``--write`` puts it in
docs/benchmarks.md. Only the profiled steps run inside cuProfilerStart/Stop.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e_decode_gpu import MODELS  # noqa: E402
from bench.kernel_trace import SM_MHZ  # noqa: E402
from bench.report import add_section_args, context_label, markdown_table, tune_arg  # noqa: E402

# Coarse kinds of kernel, first match wins (MLX CUDA's and ours' kernel names).
KINDS = (
    ("attention", r"tq_mma|tqm|sdpa|attention|flash"),
    ("matmul", r"gemv|gemm|matmul|qmv|qmm|quantized|cutlass|cublas|xmma|sm\d\d_"),
    ("copy / update", r"copy|slice|scatter|concat|gather|fill"),
)
UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
         "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}  # fmt: skip
KEEP = ("ID", "Kernel Name", "Grid Size", "Block Size", "gpu__time_duration.sum")


def short_name(kernel: str) -> str:
    """A kernel's name without its return type, arguments, template arguments,
    namespaces and the hex/number suffixes of JIT-built names."""
    name = kernel.strip()
    name = re.sub(r"^void\s+", "", name)
    depth, out = 0, []
    for ch in name:  # drop <...> (nested) and everything from the argument list on
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            break
        elif depth == 0:
            out.append(ch)
    name = "".join(out).split("::")[-1].strip()
    return re.sub(r"(_[0-9a-f]{6,}|_\d+)+$", "", name) or kernel[:40]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.I):
            return kind
    return "other"


def _ncu_rows(path: Path) -> list[list[str]]:
    """The CSV rows of an ncu ``--csv --page raw`` log (its ``==PROF==`` lines skipped)."""
    return list(csv.reader([ln for ln in path.read_text().splitlines() if ln.startswith('"')]))


def read_ncu_csv(path: Path) -> list[tuple[str, float]]:
    """(kernel name, microseconds) for every kernel of an ncu ``--csv --page raw`` log
    holding ``gpu__time_duration.sum`` (ncu's own ``==PROF==`` lines skipped; a units row,
    if present, sets the scale)."""
    rows = _ncu_rows(path)
    if not rows:
        return []
    head = rows[0]
    name_at, time_at = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
    scale, out = UNITS["nsecond"], []
    for r in rows[1:]:
        if len(r) <= max(name_at, time_at):
            continue
        if not r[0]:  # the units row: "", "", ..., "nsecond"
            scale = UNITS.get(r[time_at], scale)
            continue
        out.append((r[name_at], float(r[time_at].replace(",", "")) * scale))
    return out


def trim_ncu_csv(path: Path) -> None:
    """Keep only the columns this bench reads (ncu's raw page adds ~300 device attributes
    a kernel: megabytes a profile)."""
    rows = _ncu_rows(path)
    if not rows:
        return
    at = [rows[0].index(c) for c in KEEP if c in rows[0]]
    with path.open("w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(
            [[r[i] for i in at] for r in rows if len(r) > max(at)]
        )


def metrics_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """An ncu ``--csv --page raw`` log with any metrics: a header (kernel, then each metric
    with its unit) and one row a kernel (its short name, then the values as ncu wrote them)."""
    rows = _ncu_rows(path)
    if not rows:
        return [], []
    head = rows[0]
    units = next((r for r in rows[1:] if r and not r[0]), [""] * len(head))
    at = [i for i, h in enumerate(head) if "__" in h]  # metric names: unit__name.rollup
    header = ["kernel"] + [f"{head[i]} ({units[i]})" if units[i] else head[i] for i in at]
    name_at = head.index("Kernel Name")
    body = [[short_name(r[name_at])] + [r[i] for i in at] for r in rows[1:] if r and r[0]]
    return header, body


def summarise(kernels: list[tuple[str, float]], steps: int) -> dict:
    """Per short name and per kind: kernels and microseconds a step."""
    names: dict[str, list[float]] = {}
    for name, us in kernels:
        names.setdefault(short_name(name), []).append(us)
    by_name = {n: (len(v) / steps, sum(v) / steps) for n, v in names.items()}
    kinds: dict[str, list[float]] = {}
    for n, (count, us) in by_name.items():
        k = kinds.setdefault(kind_of(n), [0.0, 0.0])
        k[0] += count
        k[1] += us
    total = (sum(c for c, _ in by_name.values()), sum(u for _, u in by_name.values()))
    return {"names": by_name, "kinds": {k: tuple(v) for k, v in kinds.items()}, "total": total}


def report(folder: Path, top: int = 12) -> tuple[str, dict]:
    """The table of a folder's profiles (``<cache>.csv`` with ``<cache>.json`` beside it),
    fp16 first: kernels and us a step by kind, then the costliest names; and the facts."""
    metas = sorted((json.loads(p.read_text()) for p in folder.glob("*.json")),
                   key=lambda m: (m["cache"] != "fp16", m["cache"]))  # fmt: skip
    if not metas:
        raise SystemExit(f"no profiles in {folder}")
    sums = {m["cache"]: summarise(read_ncu_csv(folder / f"{m['cache']}.csv"), m["steps"])
            for m in metas}  # fmt: skip
    caches = list(sums)
    head = ["kernels", *(f"{c}: kernels / us a step" for c in caches)]
    rows = []

    def cells(get):
        return [f"{c:.0f} / {u:.1f}" if (c, u) != (0, 0) else "-"
                for c, u in (get(sums[k]) for k in caches)]  # fmt: skip

    for kind in [k for k, _ in KINDS] + ["other"]:
        rows.append([f"**{kind}**", *cells(lambda s, k=kind: s["kinds"].get(k, (0, 0)))])
    rows.append(["**all (the step's GPU time)**", *cells(lambda s: s["total"])])
    ranked = sorted({n for s in sums.values() for n in s["names"]},
                    key=lambda n: -max(s["names"].get(n, (0, 0))[1] for s in sums.values()))  # fmt: skip
    for n in ranked[:top]:
        rows.append([f"`{n}` ({kind_of(n)})", *cells(lambda s, n=n: s["names"].get(n, (0, 0)))])
    m = metas[0]
    facts = {"model": m["model"], "context": m["context"], "batch": m["batch"],
             "weight_bits": m.get("weight_bits") or 16, "steps": m["steps"],
             "gpu_us": {c: round(s["total"][1], 1) for c, s in sums.items()}}  # fmt: skip
    if "fp16" in sums:
        facts["ceiling"] = {c: round(sums["fp16"]["total"][1] / s["total"][1], 3)
                            for c, s in sums.items() if c != "fp16"}  # fmt: skip
    return markdown_table(head, rows), facts


def _traced_workspaces(cache: list) -> list:
    """The join workspaces of ``cache``'s TurboQuant layers (none off CUDA)."""
    from services.turboquant.cache import join_workspace

    works = (join_workspace(c) for c in cache if hasattr(c, "head_k"))
    return [w for w in works if w is not None]


def trace_room(cache: list) -> None:
    """Grow each TurboQuant layer's join workspace to kernel_trace.TRACE_FLOATS, where the
    traced kernel writes its blocks' timelines (before any decode step: no memo holds the
    old array)."""
    from bench.kernel_trace import TRACE_FLOATS

    for work in _traced_workspaces(cache):
        work.at_least(TRACE_FLOATS)
        work.decode_memo = None


def layer_traces(cache: list, mhz: float) -> dict:
    """Each traced layer's last fused launch, as bench/kernel_trace.py reads it: the span
    (first block start to last block end, us) a layer, their median, and kernel_trace's
    summary of the layer with the median span."""
    from bench.kernel_trace import TRACE_AT, read_trace, summary

    spans, blocks_of = [], []
    for work in _traced_workspaces(cache):
        blocks = read_trace(work) if work.floats >= TRACE_AT else []
        if blocks:
            spans.append(max(b["ns"][11] for b in blocks if 11 in b["ns"]) / 1e3)
            blocks_of.append(blocks)
    if not spans:
        return {}
    mid = sorted(range(len(spans)), key=spans.__getitem__)[len(spans) // 2]
    return {"spans_us": [round(x, 2) for x in spans], "median_us": round(spans[mid], 2),
            "median_layer": summary(blocks_of[mid], mhz)}  # fmt: skip


def profiled_steps(args) -> dict:
    """Fill one cache, warm the kernels and a few pipelined steps, then run ``--steps``
    decode steps (each evaluated) inside the profiler's range."""
    import mlx.core as mx

    from bench.e2e_decode_gpu import (
        _filled_cache,
        _step,
        build,
        decode_rate,
        join_mode,
        warm_kernels,
    )
    from services.turboquant.kernels import mma_decode

    if args.trace:  # (read when a kernel is built; tune() below forgets the builds)
        from bench.kernel_trace import TRACE_AT

        mma_decode.TRACE_AT = TRACE_AT
    mma_decode.tune(**args.tune)
    model = build(args.model, args.tiny, args.weight_bits)
    cache, kv = _filled_cache(model, args.cache, args.context, args.batch)
    if args.trace:
        trace_room(cache)
    with join_mode(args.cache, model):
        if args.cache != "fp16" and not args.no_warm:  # (else the warm steps compile what they use)
            warm_kernels(model, args.cache)
        decode_rate(model, cache, 8, batch=args.batch)  # compiles, graph caches, a steady tail
        try:
            cuda = ctypes.CDLL("libcuda.so.1")
        except OSError:  # no GPU driver: the steps run, nothing is profiled (a smoke test)
            cuda = None
        tok = mx.ones((args.batch, 1), dtype=mx.int32)
        mx.synchronize()
        if cuda:
            cuda.cuProfilerStart()
        for _ in range(args.steps):
            tok = _step(model, cache, tok)
            mx.eval(tok)
        mx.synchronize()
        if cuda:
            cuda.cuProfilerStop()
    traced = layer_traces(cache, args.mhz) if args.trace else {}
    return {"model": args.model, "cache": args.cache, "context": args.context, "traced": traced,
            "batch": args.batch, "weight_bits": args.weight_bits, "steps": args.steps,
            "kv_bytes": int(kv), "mlx": mx.__version__, "profiled": cuda is not None,
            "offset": cache[0].offset, "tune": args.tune}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="llama-3.1-8b", choices=list(MODELS))
    ap.add_argument("--cache", default="fp16", help="fp16 | tq-default | ... (e2e_decode_gpu's)")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--weight-bits", type=int)
    ap.add_argument("--steps", type=int, default=4, help="decode steps profiled")
    ap.add_argument("--tune", type=tune_arg, default={}, help="mma_decode tunables: WARPS=8,...")
    ap.add_argument("--trace", action="store_true",
                    help="our kernel built with its block timelines (kernel_trace), read after the steps")  # fmt: skip
    ap.add_argument("--mhz", type=float, default=SM_MHZ, help="SM clock for clock64 durations")
    ap.add_argument("--no-warm", action="store_true", help="skip the sidecar's kernel warm-up")
    ap.add_argument("--tiny", action="store_true", help="scaled-down shapes (smoke test)")
    ap.add_argument("--report", help="a folder of profiles: print their table")
    ap.add_argument("--metrics-report", help="an ncu CSV with any metrics: a row a kernel")
    ap.add_argument("--write", action="store_true", help="with --report: into the docs")
    ap.add_argument(
        "--trim", action="store_true", help="with --report: cut its CSVs to what it reads"
    )
    ap.add_argument("--section", default="step_profile")
    add_section_args(ap)
    args = ap.parse_args()
    if args.metrics_report:
        print(markdown_table(*metrics_rows(Path(args.metrics_report))))
        return
    if args.report:
        for f in Path(args.report).glob("*.csv") if args.trim else ():
            trim_ncu_csv(f)
        table, facts = report(Path(args.report))
        print(table + "\n" + json.dumps(facts))
        if args.write:
            from bench.report import write_section

            title = (f"A decode step's GPU time by kernel ({facts['model']}, "
                     f"{context_label(facts['context'])}, batch {facts['batch']})")  # fmt: skip
            body = (args.note + "\n\n" if args.note else "") + table
            write_section(args.section, title, body, machine=args.machine, command=args.command)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = profiled_steps(args)
    (out / f"{args.cache}.json").write_text(json.dumps(meta))
    traced = meta.pop("traced", {})
    print(json.dumps(meta))
    if traced:
        spans = traced["spans_us"]
        print(f"traced layers {len(spans)}: span min {min(spans):.1f} median "
              f"{traced['median_us']:.1f} max {max(spans):.1f} us")  # fmt: skip
        print("\n".join(traced["median_layer"]))


if __name__ == "__main__":
    main()
