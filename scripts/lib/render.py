"""Render a service template: replace every ``@NAME@`` placeholder, then validate (stdlib only).

Usage: render.py TEMPLATE OUTPUT NAME=VALUE...
Values are XML-escaped for ``.plist`` templates. A placeholder left without a value is an
error, and a rendered plist must parse, so a broken agent is never installed.
"""

from __future__ import annotations

import plistlib
import re
import sys
from pathlib import Path
from xml.sax.saxutils import escape

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def render(template: str, values: dict[str, str], *, xml: bool = False) -> str:
    """Substitute ``@NAME@`` from ``values``; raise KeyError naming any missing ones."""
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise KeyError(f"no value for placeholder(s): {', '.join(missing)}")
    return _PLACEHOLDER.sub(
        lambda m: escape(values[m.group(1)]) if xml else values[m.group(1)], template
    )


def check_systemd_unit(text: str) -> None:
    """Minimal parse of a systemd unit: sections, key=value lines, the keys we rely on."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("[") and s.endswith("]"):
            current = sections.setdefault(s[1:-1], {})
        elif "=" in s and current is not None:
            k, _, v = s.partition("=")
            current[k.strip()] = v.strip()
        else:
            raise ValueError(f"line {n} is not a section or key=value: {line!r}")
    for section, key in (
        ("Unit", "Description"),
        ("Service", "ExecStart"),
        ("Install", "WantedBy"),
    ):
        if key not in sections.get(section, {}):
            raise ValueError(f"[{section}] {key}= is missing")


def main(argv: list[str] | None = None) -> int:
    """Render TEMPLATE into OUTPUT with NAME=VALUE pairs and validate the result."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(args[0]), Path(args[1])
    values = dict(a.split("=", 1) for a in args[2:])
    is_plist = dst.name.endswith(".plist")
    try:
        text = render(src.read_text(encoding="utf-8"), values, xml=is_plist)
        if is_plist:
            plistlib.loads(text.encode("utf-8"))
        elif dst.name.endswith((".service", ".conf")):
            check_systemd_unit(text)
    except Exception as e:  # noqa: BLE001 - any parse failure means "do not install"
        print(f"render: {src.name}: {e}", file=sys.stderr)
        return 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
