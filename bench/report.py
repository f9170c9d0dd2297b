"""Write one benchmark's section into docs/benchmarks.md without touching the others."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by the benchmark named in it; re-run its command to refresh it.\n"


def machine_line() -> str:
    """One line naming the machine a benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_section(
    name: str,
    title: str,
    body: str,
    *,
    machine: str | None = None,
    command: str | None = None,
    doc: Path = DOC,
) -> None:
    """Replace the section ``name`` in docs/benchmarks.md (append it if absent)."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- bench:{name}:start -->\n## {title}\n\n"
        f"- Command: `{command or command_line()}`\n"
        f"- Machine: {machine or machine_line()}\n- Date: {date}\n\n{body.rstrip()}\n"
        f"<!-- bench:{name}:end -->\n"
    )
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)}:start -->.*?<!-- bench:{re.escape(name)}:end -->\n?", re.S
    )
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def add_section_args(ap, render_help: str | None = None) -> None:
    """A bench's options for its docs/benchmarks.md section: ``--machine``, ``--command``,
    ``--note`` and, given its help, ``--render`` (result files to write, nothing run)."""
    if render_help:
        ap.add_argument("--render", help=render_help)
    ap.add_argument("--machine", help="the section's Machine line (default: this machine)")
    ap.add_argument("--command", help="its Command line (default: this command)")
    ap.add_argument("--note", default="", help="a paragraph for the rendered section")


def tune_arg(text: str) -> dict:
    """``--tune`` values: ``WARPS=8,SPLIT_FACTOR=1`` (ints, True/False/None) for
    :func:`services.turboquant.kernels.mma_decode.tune`."""
    consts = {"True": True, "False": False, "None": None}
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        out[name.strip()] = consts[value] if value in consts else int(value)
    return out


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def context_label(n: int) -> str:
    """``4K`` for a multiple of 1024 tokens, else the exact count (``4033``: odd lengths
    are measured on purpose, e.g. to set the full-precision tail's length)."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
