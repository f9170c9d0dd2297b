"""Write and merge ``config.env`` from the documented template (stdlib only).

install.sh runs this with the system Python, before the virtualenv exists. The merge keeps
every line of the user's file (values, comments, order) and only: sets the keys given as
overrides, and appends keys that a newer template knows and the file lacks.

Usage:
  configenv.py merge --template docs/config.env.example --config C [--from-env] [--set K=V]...
  configenv.py get --template T --config C KEY     (the file's value, else the default)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Z][A-Z0-9_]*)\s*=(.*)$")


@dataclass
class Entry:
    """One documented key of the template: its default and the comment lines above it."""

    key: str
    default: str
    comments: list[str] = field(default_factory=list)


def _unquote(raw: str) -> str:
    v = raw.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    # A " #" starts an inline comment in dotenv files (pydantic-settings reads them so).
    return re.split(r"\s+#", v, maxsplit=1)[0].strip()


def parse_template(text: str) -> list[Entry]:
    """The keys of the template in order, each with the comment block just above it."""
    entries: list[Entry] = []
    pending: list[str] = []
    for line in text.splitlines():
        m = _ASSIGN.match(line)
        if m:
            entries.append(Entry(m.group(1), _unquote(m.group(2)), pending))
            pending = []
        elif line.startswith("#") and not line.startswith("# ---"):
            pending.append(line)
        else:
            pending = []
    return entries


def read_values(text: str) -> dict[str, str]:
    """Active ``KEY=value`` assignments of a dotenv text (the last one of a key wins)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        m = _ASSIGN.match(line)
        if m:
            values[m.group(1)] = _unquote(m.group(2))
    return values


def _format_value(value: str) -> str:
    # Quote only when needed so the file stays readable and dotenv-parseable.
    if value == "" or re.fullmatch(r"[A-Za-z0-9_./:~@+,-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_new(template: str, overrides: dict[str, str]) -> str:
    """The template itself with ``overrides`` put in place of the defaults."""
    out = []
    for line in template.splitlines():
        m = _ASSIGN.match(line)
        if m and m.group(1) in overrides:
            line = f"{m.group(1)}={_format_value(overrides[m.group(1)])}"
        out.append(line)
    return "\n".join(out) + "\n"


def merge(template: str, existing: str | None, overrides: dict[str, str]) -> tuple[str, list[str]]:
    """Merge ``existing`` (None: no file yet) with the template; return (text, changes)."""
    if existing is None:
        return render_new(template, overrides), ["created with every documented key"]
    changes: list[str] = []
    lines = existing.splitlines()
    last_line_of: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _ASSIGN.match(line)
        if m:
            last_line_of[m.group(1)] = i
    current = read_values(existing)
    appended: list[str] = []
    for key, value in overrides.items():
        if key in last_line_of:
            if current[key] != value:
                lines[last_line_of[key]] = f"{key}={_format_value(value)}"
                changes.append(f"{key}: {current[key]!r} -> {value!r}")
        else:
            appended.append(f"{key}={_format_value(value)}")
            changes.append(f"{key}={value!r} added")
    for entry in parse_template(template):
        if entry.key not in last_line_of and entry.key not in overrides:
            appended.extend(entry.comments)
            appended.append(f"{entry.key}={_format_value(entry.default)}")
            changes.append(f"{entry.key} added with its default {entry.default!r}")
    if appended:
        lines += ["", "# --- added by install.sh (keys your file did not have yet)", *appended]
    return "\n".join(lines) + "\n", changes


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one rename so a crash never leaves half a config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.env.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o777)
    else:
        os.chmod(tmp, 0o600)  # it may hold TQSTACK_API_KEY
    os.replace(tmp, path)


def _overrides(args: argparse.Namespace, template: str) -> dict[str, str]:
    keys = [e.key for e in parse_template(template)]
    out: dict[str, str] = {}
    if args.from_env:
        out.update({k: os.environ[k] for k in keys if k in os.environ})
    for item in args.set or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line for install.sh and the service scripts."""
    p = argparse.ArgumentParser(prog="configenv")
    sub = p.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("merge", help="create or merge config.env")
    pm.add_argument("--template", required=True, type=Path)
    pm.add_argument("--config", required=True, type=Path)
    pm.add_argument("--from-env", action="store_true", help="documented keys set in env win")
    pm.add_argument("--set", action="append", metavar="KEY=VALUE")
    pg = sub.add_parser("get", help="print one key's value (file, else template default)")
    pg.add_argument("--template", required=True, type=Path)
    pg.add_argument("--config", required=True, type=Path)
    pg.add_argument("key")
    args = p.parse_args(argv)

    template = args.template.read_text(encoding="utf-8")
    existing = args.config.read_text(encoding="utf-8") if args.config.is_file() else None
    if args.cmd == "get":
        values = {e.key: e.default for e in parse_template(template)}
        values.update(read_values(existing or ""))
        if args.key not in values:
            print(f"configenv: unknown key {args.key}", file=sys.stderr)
            return 2
        print(values[args.key])
        return 0
    text, changes = merge(template, existing, _overrides(args, template))
    if text != existing:
        write_atomic(args.config, text)
    for c in changes:
        print(f"  config.env: {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
