"""Router overhead: latency and time to first chunk added by going through the router.

Starts a fast loopback upstream (a raw asyncio HTTP server speaking just enough of Ollama's
and the sidecar's dialects) and the real router (``python -m services.router``) in separate
processes, then streams chat completions directly and through the router at concurrency
1, 64 and 256, alternating direct and routed rounds so both see the same machine load.
Writes the table into docs/benchmarks.md (section ``router_overhead``). Stops everything
it started; loopback only.

    .venv/bin/python bench/router_overhead.py            # default run, ~2 minutes
    .venv/bin/python bench/router_overhead.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import markdown_table, pct, write_section  # noqa: E402

# --------------------------------------------------------------------------- the upstream

CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"content":"tok"},'
    b'"finish_reason":null}]}\n\n'
)
FINISH = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{},'
    b'"finish_reason":"stop"}]}\n\n'
)


def _json_response(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def _serve_upstream_conn(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunks: int
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            if path == "/health":
                writer.write(
                    _json_response(
                        {
                            "status": "ok",
                            "model": "bench-model",
                            "architecture": "pure_sdpa",
                            "context_length": 131072,
                        }
                    )
                )
            elif path == "/api/version":
                writer.write(_json_response({"version": "0.33.0"}))
            elif path == "/api/ps":
                writer.write(_json_response({"models": []}))
            elif path == "/api/show":
                writer.write(
                    _json_response(
                        {"model_info": {"general.architecture": "x", "x.context_length": 131072}}
                    )
                )
            elif method == "POST" and path.endswith("/chat/completions"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                # model "paced-<ms>": that many ms between chunks, like a generating model
                model = str(json.loads(body or b"{}").get("model", ""))
                interval = float(model[6:]) / 1000 if model.startswith("paced-") else 0.0
                # each event is written (and flushed) on its own, as a generating server does
                for i in range(chunks):
                    if interval and i:
                        await asyncio.sleep(interval)
                    writer.write(_chunk(CHUNK))
                    await writer.drain()
                writer.write(_chunk(FINISH) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve_upstream(port: int, chunks: int) -> None:
    """Run the fast upstream forever (a child process of the benchmark)."""

    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: _serve_upstream_conn(r, w, chunks), "127.0.0.1", port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --------------------------------------------------------------------------- the client


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[float | None, int]:
    """Read one chunked body; return (time of the first non-empty chunk, bytes)."""
    first = None
    total = 0
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return first, total
        await reader.readexactly(size + 2)
        total += size
        if first is None:
            first = time.perf_counter()


async def _worker(port: int, n: int, out: list, errors: list, model: str) -> None:
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    reader = writer = None
    for _ in range(n):
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200 or b"chunked" not in head.lower():
                raise RuntimeError(f"HTTP {status}")
            first, size = await _read_chunked(reader)
            t1 = time.perf_counter()
            out.append(((first or t1) - t0, t1 - t0))
        except Exception as e:  # count it and reconnect
            errors.append(type(e).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _round(
    port: int, concurrency: int, per_worker: int, model: str = "bench"
) -> tuple[list, list]:
    out: list = []
    errors: list = []
    await asyncio.gather(
        *(_worker(port, per_worker, out, errors, model) for _ in range(concurrency))
    )
    return out, errors


# --------------------------------------------------------------------------- orchestration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, path: str, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"nothing answered on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--chunks", type=int, default=8, help="content chunks per stream")
    ap.add_argument("--concurrency", default="1,64,256")
    ap.add_argument("--rounds", type=int, default=3, help="direct/router round pairs per level")
    ap.add_argument(
        "--streams", type=int, default=384, help="streams per round (at least one per client)"
    )
    ap.add_argument(
        "--paced",
        default="64@20",
        help="an extra level C@MS: C streams whose chunks come MS ms apart ('' to skip)",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round, fewer streams")
    ap.add_argument("--router-http", default="auto", choices=["auto", "httptools", "h11"],
                    help="the router's ROUTER_HTTP (its parser and event loop)")  # fmt: skip
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--section", default="router_overhead", help="docs/benchmarks.md section")
    args = ap.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.chunks)
        return
    if args.quick:
        args.rounds, args.streams = 1, 128

    up_port, router_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env.update(
        PYTHONPATH=str(REPO),
        TQSTACK_CONFIG="/nonexistent/config.env",
        LOG_LEVEL="WARNING",
        ROUTER_PORT=str(router_port),
        ROUTER_HTTP=args.router_http,
        OLLAMA_URL=f"http://127.0.0.1:{up_port}",
        SIDECAR_URL=f"http://127.0.0.1:{up_port}",
        MEMORY_SAVER="0",
        HEALTH_INTERVAL_S="2",
    )
    env.pop("TQSTACK_API_KEY", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve-upstream",
                str(up_port),
                "--chunks",
                str(args.chunks),
            ]
        ),
        subprocess.Popen([sys.executable, "-m", "services.router"], env=env, cwd=REPO),
    ]
    rows = []
    load_before = os.getloadavg()[0]
    try:
        _wait(up_port, "/api/version")
        _wait(router_port, "/health")
        asyncio.run(_round(router_port, 8, 5))  # warm the router's connection pool
        levels = [(int(x), 0) for x in args.concurrency.split(",")]
        if args.paced:
            c, _, ms = args.paced.partition("@")
            levels.append((int(c), int(ms)))
        for c, paced_ms in levels:
            per = max(1, args.streams // c) if c > 1 else max(50, args.streams // 4)
            model = f"paced-{paced_ms}" if paced_ms else "bench"
            if paced_ms:
                per = 2
            res = {"direct": ([], []), "router": ([], [])}
            router_cpu = 0.0
            for _ in range(args.rounds):
                for name, port in (("direct", up_port), ("router", router_port)):
                    cpu0 = cpu_seconds(procs[1].pid)
                    out, errs = asyncio.run(_round(port, c, per, model))
                    if name == "router":
                        router_cpu += cpu_seconds(procs[1].pid) - cpu0
                    res[name][0].extend(out)
                    res[name][1].extend(errs)
            d, r = res["direct"][0], res["router"][0]
            dt, rt = [x[1] * 1000 for x in d], [x[1] * 1000 for x in r]
            df, rf = [x[0] * 1000 for x in d], [x[0] * 1000 for x in r]
            rows.append(
                [
                    f"{c} (paced {paced_ms} ms/chunk)" if paced_ms else c,
                    len(r),
                    len(res["router"][1]) + len(res["direct"][1]),
                    f"{pct(dt, 0.5):.2f} / {pct(dt, 0.99):.2f}",
                    f"{pct(rt, 0.5):.2f} / {pct(rt, 0.99):.2f}",
                    f"{pct(rt, 0.5) - pct(dt, 0.5):+.2f}",
                    f"{pct(rt, 0.99) - pct(dt, 0.99):+.2f}",
                    f"{pct(rf, 0.5) - pct(df, 0.5):+.2f}",
                    f"{pct(rf, 0.99) - pct(df, 0.99):+.2f}",
                    f"{1000 * router_cpu / max(1, len(r)):.2f}",
                ]
            )
            print(rows[-1], flush=True)
        import httpx

        metrics = httpx.get(f"http://127.0.0.1:{router_port}/metrics").text
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    load_after = os.getloadavg()[0]
    internal = _internal_overhead_ms(metrics)
    table = markdown_table(
        [
            "concurrency",
            "streams via router",
            "errors",
            "direct p50/p99 ms",
            "router p50/p99 ms",
            "added p50 ms",
            "added p99 ms",
            "TTFB added p50 ms",
            "TTFB added p99 ms",
            "router CPU ms/stream",
        ],
        rows,
    )
    body = (
        f"Each stream: {args.chunks} content chunks + finish + `[DONE]` from a raw-asyncio "
        f"loopback upstream; clients are raw asyncio HTTP/1.1 with keep-alive. {args.rounds} "
        'alternating direct/router round pair(s) per level; "added" = router minus direct '
        "at the same percentile. The paced row spaces the upstream's chunks like a model "
        "generating 50 tokens/s, so the router is not saturated by a burst.\n\n" + table + "\n"
        f"Router time before the upstream call (parse, route, normalise; its own histogram): "
        f'mean {internal:.3f} ms. "router CPU ms/stream" is the router process\'s own CPU time '
        "(/proc) divided by the streams it relayed: the figure that does not depend on how "
        "busy the machine was.\n\n"
        f"Load average (1 min) before/after: {load_before:.2f} / {load_after:.2f} on "
        f"{os.cpu_count()} cores shared with other work; client, router and upstream are "
        "three processes on the same cores, so at 64+ streams the figures include CPU "
        f"contention, not only router code. The router ran with ROUTER_HTTP={args.router_http}: "
        f"{_http_stack(args.router_http)}.\n"
    )
    print(body)
    if not args.no_write:
        title = "Router overhead (added latency vs direct)"
        if args.section != "router_overhead":
            title += f" [{args.section}]"
        write_section(args.section, title, body)


def _http_stack(setting: str) -> str:
    """The router's parser and event loop under ``ROUTER_HTTP=setting`` on this machine."""
    import importlib.util

    if setting == "h11":
        return "uvicorn's pure-Python h11 parser, the asyncio loop"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11 (no httptools)"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio (no uvloop)"
    return f"the {parser} parser, the {loop} loop"


def _internal_overhead_ms(metrics: str) -> float:
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("tqstack_router_overhead_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("tqstack_router_overhead_seconds_count"):
            count = float(line.split()[-1])
    return 1000 * total / count if count else float("nan")


if __name__ == "__main__":
    main()
