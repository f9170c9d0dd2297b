"""``tqstack-router`` / ``python -m services.router``: serve the router with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from services.config import is_loopback, load_settings


def main(argv: list[str] | None = None) -> int:
    """Start the router in the foreground on ROUTER_HOST:ROUTER_PORT."""
    ap = argparse.ArgumentParser(prog="tqstack-router", description=__doc__)
    ap.add_argument("--config", help="config.env to read (default: $TQSTACK_HOME/config.env)")
    ap.add_argument("--host", help="override ROUTER_HOST")
    ap.add_argument("--port", type=int, help="override ROUTER_PORT")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in (("router_host", args.host), ("router_port", args.port)) if v}
    settings = load_settings(args.config, **overrides)
    if not is_loopback(settings.router_host) and not settings.tqstack_api_key:
        print(
            f"tqstack-router: refusing to listen on {settings.router_host}, which is not a "
            "loopback address, without an API key. Set TQSTACK_API_KEY (clients then send "
            "'Authorization: Bearer <key>') or bind ROUTER_HOST=127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from services.http_protocol import enveloped_http

    from .app import create_app

    try:
        protocol = enveloped_http("router", settings.router_http)
    except RuntimeError as e:
        print(f"tqstack-router: {e} (pip install httptools, or ROUTER_HTTP=auto)", file=sys.stderr)
        return 2
    # access_log off: request lines cost time on the hot path; we count in /metrics instead
    uvicorn.run(
        create_app(settings),
        host=settings.router_host,
        port=settings.router_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        # longer than clients' own idle expiry (httpx/OpenAI SDK: 5 s): at uvicorn's default
        # of 5 s a request sent on a connection being closed is reset unanswered
        timeout_keep_alive=75,
        timeout_graceful_shutdown=5,
        # parser-level 400s in the OpenAI envelope too; httptools + uvloop: ~10 % less CPU a
        # relayed stream than h11 + asyncio (bench/router_overhead.py)
        http=protocol,
        loop="asyncio" if settings.router_http == "h11" else "auto",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
