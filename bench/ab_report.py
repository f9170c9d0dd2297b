"""An A/B of one kernel setting on the GPU, as a docs/benchmarks.md section: interleaved
split-kernel sweeps with and without it (``bash bench/gpu_session.sh ab NAME=VALUE``) and,
optionally, ncu's per-instruction stall samples of one launch each (``ncu-src``)::

    python bench/ab_report.py --name "looped value steps" \\
        --sweeps R/ab-1-default,R/ab-1-tuned,R/ab-2-default,R/ab-2-tuned,... \\
        --ncu R/ncu/src_base.csv.gz,R/ncu/src_cval.csv.gz --write

Sweeps come in (default, tuned) pairs, one pair a round; each gives the rule's split
count on the 1-D grid at every context. Rounds alternate the two builds in one machine
start, so host and clock drift fall on both (single sweeps of one build spread ~3 us).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# ncu's sampled warp states, as the source page's columns name them
STALLS = ("stall_no_inst", "stall_selected", "stall_wait", "stall_long_sb", "stall_short_sb",
          "stall_imc", "stall_barrier", "stall_dispatch", "stall_branch_resolving")  # fmt: skip
TOTAL = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def rule_times(sweep: list[dict]) -> dict[int, float]:
    """Context -> microseconds of the rule's split count on the 1-D grid."""
    return {r["context"]: r["us"] for r in sweep if r.get("rule") and r.get("linear")}


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def source_counts(text: str) -> Counter:
    """Sampled stalls (and instructions executed) summed over every instruction of an ncu
    source page (``ncu -i REPORT --page source --csv --print-source sass``)."""
    rows = list(csv.reader(io.StringIO(text)))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    names = rows[head]
    out = Counter()
    for row in rows[head + 1 :]:
        if len(row) != len(names):
            continue
        cells = dict(zip(names, row, strict=True))
        for key in (TOTAL, EXECUTED, *STALLS):
            out[key] += _number(cells.get(key, "0"))
    return out


def _read(path: str) -> str:
    raw = Path(path).read_bytes()
    return (gzip.decompress(raw) if path.endswith(".gz") else raw).decode()


def sweep_table(pairs: list[tuple[list[dict], list[dict]]], name: str) -> str:
    from bench.report import context_label, markdown_table

    rounds = [(rule_times(a), rule_times(b)) for a, b in pairs]
    contexts = sorted(set.intersection(*(set(a) & set(b) for a, b in rounds)))
    head = ["context"] + [f"round {i + 1}: default / {name} (us)" for i in range(len(rounds))]
    head += ["median default (us)", f"median {name} (us)", f"{name} vs default"]
    rows = []
    for n in contexts:
        a = [r[0][n] for r in rounds]
        b = [r[1][n] for r in rounds]
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append([context_label(n), *(f"{x:.1f} / {y:.1f}" for x, y in zip(a, b, strict=True)),
                     f"{ma:.1f}", f"{mb:.1f}", f"{ma / mb:.2f}x"])  # fmt: skip
    return markdown_table(head, rows)


def ncu_table(base: Counter, tuned: Counter, name: str) -> str:
    from bench.report import markdown_table

    rows = [[key.removeprefix("stall_"), f"{base[key]:.0f}", f"{tuned[key]:.0f}"]
            for key in (TOTAL, *STALLS, EXECUTED)]  # fmt: skip
    rows[0][0] = "all samples"
    return markdown_table(["ncu (one launch)", "default", name], rows)


def main() -> None:
    from bench.report import add_section_args

    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True, help="what the tuned build changes")
    ap.add_argument("--sweeps", required=True, help="split_sweep output folders, in pairs")
    ap.add_argument("--ncu", help="two source-page CSVs (.csv or .csv.gz): default, tuned")
    add_section_args(ap)
    ap.add_argument("--write", action="store_true", help="write the docs/benchmarks.md section")
    ap.add_argument("--section", default="kernel_ab",
                    help="its name (another A/B's section is left as it is)")  # fmt: skip
    args = ap.parse_args()
    dirs = args.sweeps.split(",")
    if len(dirs) % 2:
        sys.exit("--sweeps: (default, tuned) pairs")
    sweeps = [json.loads((Path(d) / "split_sweep.json").read_text()) for d in dirs]
    body = sweep_table(list(zip(sweeps[::2], sweeps[1::2], strict=True)), args.name)
    if args.ncu:
        base, tuned = (source_counts(_read(p)) for p in args.ncu.split(","))
        body += "\n\n" + ncu_table(base, tuned, args.name)
    if args.note:
        body = args.note + "\n\n" + body
    print(body)
    if args.write:
        from bench.report import write_section

        write_section(args.section, f"Split kernel A/B: {args.name}", body,
                      machine=args.machine, command=args.command)  # fmt: skip


if __name__ == "__main__":
    main()
