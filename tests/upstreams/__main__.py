"""Run one fake backend in the foreground: ``python -m tests.upstreams ollama --port 11434``."""

from __future__ import annotations

import argparse
import json

import uvicorn

from .fake_ollama import FakeOllama
from .fake_sidecar import FakeSidecar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kind", choices=["ollama", "sidecar"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--faults", default="{}", help="JSON object of Faults fields")
    ap.add_argument("--architecture", default="pure_sdpa", help="sidecar: pure_sdpa|hybrid")
    ap.add_argument("--context-length", type=int, default=32768, help="sidecar context")
    ap.add_argument("--num-ctx", type=int, default=4096, help="ollama: context once loaded")
    args = ap.parse_args()
    if args.kind == "ollama":
        fake = FakeOllama(args.port, num_ctx=args.num_ctx)
    else:
        fake = FakeSidecar(
            args.port, architecture=args.architecture, context_length=args.context_length
        )
    fake.faults.update(**json.loads(args.faults))
    uvicorn.run(fake.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
