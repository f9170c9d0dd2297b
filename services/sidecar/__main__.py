"""``tqstack-sidecar`` / ``python -m services.sidecar``: serve the MLX sidecar in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys

from services.config import is_loopback, load_settings


def main(argv: list[str] | None = None) -> int:
    """Run the sidecar on SIDECAR_HOST:SIDECAR_PORT until interrupted."""
    ap = argparse.ArgumentParser(prog="tqstack-sidecar", description=__doc__)
    ap.add_argument("--config", help="config.env to read (default: $TQSTACK_HOME/config.env)")
    ap.add_argument("--host", help="bind address (default: SIDECAR_HOST)")
    ap.add_argument("--port", type=int, help="port (default: SIDECAR_PORT)")
    ap.add_argument("--model", help="model to serve (default: SIDECAR_MODEL)")
    args = ap.parse_args(argv)

    overrides = {
        k: v
        for k, v in {
            "sidecar_host": args.host,
            "sidecar_port": args.port,
            "sidecar_model": args.model,
        }.items()
        if v is not None
    }
    settings = load_settings(args.config, **overrides)
    if not is_loopback(settings.sidecar_host):
        # the sidecar has no authentication: only the router (on loopback) may reach it
        print(
            f"tqstack-sidecar: refusing to listen on {settings.sidecar_host}: the sidecar has no "
            "authentication and must stay on a loopback address (SIDECAR_HOST=127.0.0.1). "
            "Expose the router instead, with TQSTACK_API_KEY set.",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import uvicorn

    from services.http_protocol import enveloped_h11
    from services.sidecar.app import create_app
    from services.sidecar.engine import Engine

    engine = Engine(settings)
    app = create_app(settings, engine)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.sidecar_host,
            port=settings.sidecar_port,
            log_level=settings.log_level.lower(),
            access_log=False,
            # Streams can run for minutes: on shutdown cut them (their jobs get cancelled).
            timeout_graceful_shutdown=5,
            http=enveloped_h11("sidecar"),  # parser-level 400s in the OpenAI envelope too
            loop="asyncio",  # (the model, not the loop, bounds it; uvloop is the router's)
        )
    )

    def _give_up() -> None:
        # A model that cannot load ends the process (non-zero), not a server stuck at 503.
        server.should_exit = True

    engine.on_failure = _give_up
    server.run()
    if engine.status == "failed":
        print(f"tqstack-sidecar: model failed to load: {engine.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
