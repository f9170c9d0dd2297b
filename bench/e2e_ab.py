"""Two builds' end-to-end decode, alternated process by process in one machine start, as
one verdict: each process's ratio to fp16, the medians per build, and the host columns that
say why. At batch 1 a process's ratio spreads ~0.035 (the VM's host), so a change of 2-3 %
needs ~20 processes a build; ``bash bench/gpu_session.sh e2e-ab N`` runs them::

    python bench/e2e_ab.py R1/e2e-ab R2/e2e-ab       # print the verdict (calls in order)
    python bench/e2e_ab.py R1/e2e-ab R2/e2e-ab --write --section e2e_ab_x --title "..." --note "..."

A directory holds ``<build>-<i>/e2e_decode_gpu.json`` (one process each: the row of each
cache, as ``bench/e2e_decode_gpu.py`` writes it) and ``order.txt``, the builds' names in the
order they ran (the processes' numbers in the rendered table follow it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import add_section_args, markdown_table  # noqa: E402

CACHE = "tq-default"


def processes(root: Path) -> list[tuple[str, Path]]:
    """(build, JSON file) of every process in the order they ran: ``order.txt`` if present,
    else by name (build, then number)."""
    order = root / "order.txt"
    names = order.read_text().split() if order.exists() else None
    if names is None:
        names = sorted(
            (p.name for p in root.iterdir() if (p / "e2e_decode_gpu.json").exists()),
            key=lambda n: (n.rsplit("-", 1)[0], int(n.rsplit("-", 1)[1])),
        )
    out = []
    for name in names:
        f = root / name / "e2e_decode_gpu.json"
        if f.exists():  # (a process that failed or timed out left nothing: not a sample)
            out.append((name.rsplit("-", 1)[0], f))
    return out


def sample(f: Path, cache: str = CACHE) -> dict | None:
    """One process's numbers for ``cache`` against fp16 in the same process (None if either
    row is missing)."""
    rows = {r["cache"]: r for r in json.loads(f.read_text())["rows"]}
    if cache not in rows or "fp16" not in rows:
        return None
    ours, base = rows[cache], rows["fp16"]
    return {
        "ratio": ours.get("vs_first", ours["tok_s"] / base["tok_s"]),
        "tok_s": ours["tok_s"],
        "fp16_tok_s": base["tok_s"],
        "build_ms": ours["host_ms"]["build"],
        "wait_ms": ours["host_ms"]["wait"],
        "fp16_build_ms": base["host_ms"]["build"],
    }


def verdict(roots: Path | list[Path], cache: str = CACHE, goal: float = 1.1) -> dict:
    """Per build: its processes' ratios in order (``roots``: one directory a device call, in
    the order they ran), the median ratio, how many reach ``goal``, and the medians of the
    other columns."""
    roots = [roots] if isinstance(roots, Path) else roots
    by: dict[str, list[dict]] = {}
    for build, f in (p for root in roots for p in processes(root)):
        s = sample(f, cache)
        if s is not None:
            by.setdefault(build, []).append(s)
    out = {}
    for build, xs in by.items():
        out[build] = {
            "n": len(xs),
            "ratios": [x["ratio"] for x in xs],  # (rounded only where shown)
            "median": statistics.median(x["ratio"] for x in xs),
            "at_goal": sum(x["ratio"] >= goal for x in xs),
            **{k: statistics.median(x[k] for x in xs)
               for k in ("tok_s", "fp16_tok_s", "build_ms", "wait_ms", "fp16_build_ms")},
        }  # fmt: skip
    return out


def summary(v: dict, goal: float = 1.1) -> str:
    head = ["build", "processes", "vs fp16 a process (in order)", "median", f"at >= {goal}x",
            "ours tok/s", "fp16 tok/s", "ours build / wait ms a step", "fp16 build ms"]  # fmt: skip
    rows = [
        [build, s["n"], " / ".join(f"{r:.2f}" for r in s["ratios"]), f"{s['median']:.3f}x",
         s["at_goal"], f"{s['tok_s']:.1f}", f"{s['fp16_tok_s']:.1f}",
         f"{s['build_ms']:.2f} / {s['wait_ms']:.2f}", f"{s['fp16_build_ms']:.2f}"]
        for build, s in v.items()
    ]  # fmt: skip
    return markdown_table(head, rows).rstrip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", help="directories of <build>-<i>/e2e_decode_gpu.json")
    ap.add_argument("--cache", default=CACHE)
    ap.add_argument("--goal", type=float, default=1.1)
    ap.add_argument("--write", action="store_true", help="write the docs section too")
    ap.add_argument("--section", default="e2e_ab")
    ap.add_argument("--title", default="End-to-end decode on the GPU: two builds alternated")
    add_section_args(ap)
    args = ap.parse_args()
    roots = [Path(r) for r in args.roots]
    v = verdict(roots, args.cache, args.goal)
    table = summary(v, args.goal)
    print(table)
    if args.write:
        from bench import e2e_decode_gpu

        procs = [p for root in roots for p in processes(root)]
        files = ",".join(str(f) for _, f in procs)
        order = ", ".join(f"{i} {b}" for i, (b, _) in enumerate(procs, 1))
        note = (args.note + "\n\n" if args.note else "") + table + f"\n\nProcesses: {order}."
        e2e_decode_gpu.render(files, args.machine, args.command, note, args.section, args.title)


if __name__ == "__main__":
    main()
