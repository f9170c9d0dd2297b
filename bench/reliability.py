"""Reliability runs at full size: chaos, disconnects, load and soak through the real router.

Every run starts the real router (``python -m services.router``) and the loopback fake
backends (``python -m tests.upstreams``) as child processes on 127.0.0.1, drives them from
asyncio, classifies every answer (``tests/reliability/outcome.py``), prints one JSON summary
and stops everything it started. Each run is bounded by ``--max-seconds``.

    .venv/bin/python bench/reliability.py chaos --requests 10000
    .venv/bin/python bench/reliability.py disconnects --clients 1000
    .venv/bin/python bench/reliability.py load --streams 512
    .venv/bin/python bench/reliability.py soak --requests 50000

The figures go into docs/reliability.md by hand, with the command that produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import command_line, machine_line  # noqa: E402
from tests.reliability.load import client_for, run_many  # noqa: E402
from tests.reliability.outcome import Tally  # noqa: E402
from tests.upstreams import free_port  # noqa: E402

OLLAMA_MODEL = "qwen3.5:35b-a3b-coding-nvfp4"
LONG = "word " * 6000  # over the pure-SDPA threshold: routed to the sidecar


# --------------------------------------------------------------------------- processes


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
        TQSTACK_CONFIG=str(REPO / ".cache" / "no-config.env"),  # never a user's config.env
    )
    env.pop("TQSTACK_API_KEY", None)
    env.update(extra)
    return env


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


class Child:
    """One child process on a fixed loopback port; ``kill`` is SIGKILL, ``start`` respawns."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, **env: str) -> None:
        self.name, self.argv, self.port, self.ready_path = name, argv, port, ready_path
        self.env = _env(**env)
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Child:
        # the router's own output is kept (appended across restarts) and scanned after a run
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        if self.log:
            out.close()
        wait_ready(self.url + self.ready_path, self.proc)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def fake(kind: str, faults: dict[str, Any] | None = None) -> Child:
    port = free_port()
    argv = [sys.executable, "-m", "tests.upstreams", kind, "--port", str(port)]
    argv += ["--faults", json.dumps(faults or {})]
    if kind == "ollama":
        argv += ["--num-ctx", "65536"]  # long prompts fit Ollama too, so fallback can take them
    return Child(kind, argv, port, "/api/version" if kind == "ollama" else "/health")


def router(ollama: Child, sidecar: Child, **settings: str) -> Child:
    port = free_port()
    env = {
        "ROUTER_HOST": "127.0.0.1",
        "ROUTER_PORT": str(port),
        "OLLAMA_URL": ollama.url,
        "SIDECAR_URL": sidecar.url,
        "OLLAMA_MODEL": OLLAMA_MODEL,
        "MEMORY_SAVER": "0",
        "LOG_LEVEL": "WARNING",
        "HEALTH_INTERVAL_S": "0.5",
        "HEALTH_TIMEOUT_S": "0.5",
        "HEALTH_FAILURES_DOWN": "1",
        "UPSTREAM_READ_TIMEOUT_S": "5",
        **settings,
    }
    child = Child("router", [sys.executable, "-m", "services.router"], port, "/health", **env)
    child.log = Path(tempfile.gettempdir()) / f"tqstack-reliability-router-{port}.log"
    return child


def log_problems(child: Child) -> dict[str, Any]:
    """Errors and tracebacks the router wrote during the run (it logs no request content)."""
    if not child.log or not child.log.exists():
        return {}
    lines = child.log.read_text(errors="replace").splitlines()
    bad = [ln for ln in lines if "Traceback" in ln or " ERROR " in ln or "Exception" in ln]
    return {
        "router_log": str(child.log),
        "router_log_error_lines": len(bad),
        "router_log_examples": bad[:5],
    }


def set_faults(child: Child, **faults: Any) -> None:
    httpx.post(child.url + "/_control/faults", json={"reset": True, **faults}, timeout=5)


# --------------------------------------------------------------------------- /proc probes


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sockets_to(pid: int, port: int) -> int:
    """ESTABLISHED TCP sockets of process ``pid`` whose remote port is ``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port and cols[9] in inodes:
                n += 1
    return n


def router_health(r: Child) -> dict[str, Any]:
    return httpx.get(r.url + "/health", timeout=5).json()


def count_499(r: Child) -> int:
    """Requests the router's /metrics counted as client disconnects."""
    total = 0
    for line in httpx.get(r.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("tqstack_router_requests_total{") and 'status="499"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def fake_state(f: Child) -> dict[str, Any]:
    s = httpx.get(f.url + "/_control/state", timeout=30).json()
    gens = sum(1 for q in s["requests"] if q["path"].endswith("completions"))
    return {k: v for k, v in s.items() if k != "requests"} | {"generations": gens}


# --------------------------------------------------------------------------- runs


def bodies(n: int, seed: int, long_share: float = 0.5):
    """Mixed requests: stream / non-stream, short (Ollama) / long (sidecar), some completions."""
    rnd = random.Random(seed)
    for _ in range(n):
        stream = rnd.random() < 0.5
        long = rnd.random() < long_share
        content = LONG if long else "hi"
        if rnd.random() < 0.2:
            yield "/v1/completions", {"model": OLLAMA_MODEL, "prompt": content, "stream": stream}
        else:
            msg = [{"role": "user", "content": content}]
            yield "/v1/chat/completions", {"model": OLLAMA_MODEL, "messages": msg, "stream": stream}


async def chaos(args: argparse.Namespace) -> dict[str, Any]:
    """Random SIGKILL + restart of one backend at a time while ``--requests`` run."""
    o, s = fake("ollama", {"reply_tokens": 6}).start(), fake("sidecar", {"reply_tokens": 6}).start()
    r = router(o, s).start()
    rnd = random.Random(args.seed)
    kills = {"ollama": 0, "sidecar": 0}
    done = asyncio.Event()

    async def killer() -> None:
        while not done.is_set():
            await asyncio.sleep(rnd.uniform(0.2, 2.0))
            if done.is_set():
                return
            victim = rnd.choice([o, s])
            await asyncio.to_thread(victim.kill)
            kills[victim.name] += 1
            await asyncio.sleep(rnd.uniform(0.05, 1.0))
            await asyncio.to_thread(victim.start)

    t0 = time.monotonic()
    task = asyncio.create_task(killer())
    try:
        tally = await run_many(
            r.url,
            bodies(args.requests, args.seed),
            concurrency=args.concurrency,
            deadline_s=20.0,  # read timeout 5 s + restarts on a busy machine
        )
    finally:
        done.set()
        await task
    elapsed = time.monotonic() - t0
    after = await run_many(r.url, bodies(100, args.seed + 1), concurrency=10, deadline_s=20.0)
    out = {
        "scenario": "chaos",
        "kills": kills,
        "elapsed_s": round(elapsed, 1),
        **tally.summary(),
        "after_recovery": after.summary(),
        **log_problems(r),
    }
    for c in (r, o, s):
        c.stop()
    return out


async def disconnects(args: argparse.Namespace) -> dict[str, Any]:
    """``--clients`` clients drop their stream mid-way (and some before the first byte)."""
    o = fake("ollama", {"chunk_delay_s": 0.05, "reply_tokens": 400}).start()
    s = fake("sidecar").start()
    # health polls every 60 s: the upstream socket count is then only what the requests left
    r = router(o, s, HEALTH_INTERVAL_S="60", UPSTREAM_READ_TIMEOUT_S="60").start()
    msg = [{"role": "user", "content": "hi"}]
    body = json.dumps({"model": OLLAMA_MODEL, "messages": msg, "stream": True}).encode()
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    async with client_for(r.url, 4) as c:  # warm the pool, then take the baseline
        await c.post("/v1/chat/completions", json={"model": OLLAMA_MODEL, "messages": msg})
    await asyncio.sleep(0.5)
    base = {
        "fds": open_fds(r.pid),
        "upstream_sockets": sockets_to(r.pid, o.port),
        "rss_kib": rss_kib(r.pid),
    }
    sem = asyncio.Semaphore(args.concurrency)
    problems: list[str] = []

    async def one(i: int) -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
            writer.write(req)
            await writer.drain()
            want = 0 if i % 10 == 0 else 1 + i % 5  # a tenth leave before any event
            got = b""
            try:
                while got.count(b"data:") < want:
                    piece = await asyncio.wait_for(reader.read(65536), 30)
                    if not piece:
                        problems.append("closed early")
                        break
                    got += piece
            except asyncio.TimeoutError:
                problems.append("no data in 30 s")
            writer.transport.abort()

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(args.clients)))
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # let the last cancellations land
        st = fake_state(o)
        if st["active_streams"] == 0 and router_health(r)["active_streams"] == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    st = fake_state(o)
    after = {
        "fds": open_fds(r.pid),
        "upstream_sockets": sockets_to(r.pid, o.port),
        "rss_kib": rss_kib(r.pid),
    }
    gens = st["generations"] - 1  # minus the warm-up request
    out = {
        "scenario": "disconnects",
        "clients": args.clients,
        "elapsed_s": round(elapsed, 1),
        "client_problems": len(problems),
        "upstream_streams_still_open": st["active_streams"],
        "upstream_disconnects_seen": st["disconnects"],
        "upstream_completed_streams": st["completed_streams"],
        "router_counted_499": count_499(r),
        "upstream_requests": gens,
        "router_active_streams": router_health(r)["active_streams"],
        "router_fds": [base["fds"], after["fds"]],
        "router_upstream_sockets": [base["upstream_sockets"], after["upstream_sockets"]],
        "router_rss_kib": [base["rss_kib"], after["rss_kib"]],
        **log_problems(r),
    }
    for c in (r, o, s):
        c.stop()
    return out


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """``--streams`` streams open at once through the router, all read to the end."""
    from tests.reliability.outcome import Outcome, classify_sse

    # 60 pieces 1 s apart: each stream lasts a minute, longer than opening them all takes here
    o = fake("ollama", {"chunk_delay_s": 1.0, "reply_tokens": 60}).start()
    s = fake("sidecar").start()
    r = router(o, s, HEALTH_TIMEOUT_S="2", HEALTH_FAILURES_DOWN="2").start()
    n = args.streams
    tally = Tally()
    peak = {"router": 0, "upstream": 0}
    finished = asyncio.Event()

    async def sample() -> None:
        async with httpx.AsyncClient(timeout=10) as c:
            while not finished.is_set():
                try:
                    h = (await c.get(r.url + "/health")).json()
                    u = (await c.get(o.url + "/_control/state")).json()
                    peak["router"] = max(peak["router"], h["active_streams"])
                    peak["upstream"] = max(peak["upstream"], u["active_streams"])
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(1.0)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        t = time.perf_counter()
        body = {
            "model": OLLAMA_MODEL,
            "messages": [{"role": "user", "content": f"stream {i}"}],
            "stream": True,
        }
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                data = await resp.aread()
                out = classify_sse(data, resp.headers.get("x-tqstack-backend"))
                if resp.status_code != 200:
                    out = Outcome("error", resp.status_code, detail=data[:200].decode())
        except httpx.HTTPError as e:
            out = Outcome("lost", detail=repr(e))
        out.elapsed = time.perf_counter() - t
        tally.add(out)

    t0 = time.monotonic()
    sampler = asyncio.create_task(sample())
    async with client_for(r.url, n) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    finished.set()
    await sampler
    out = {
        "scenario": "load",
        "streams": n,
        "peak_router_active_streams": peak["router"],
        "peak_upstream_open_streams": peak["upstream"],
        "elapsed_s": round(time.monotonic() - t0, 1),
        **tally.summary(),
        **log_problems(r),
    }
    for c in (r, o, s):
        c.stop()
    return out


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """``--requests`` requests; router RSS after warm-up vs at the end."""
    o, s = fake("ollama").start(), fake("sidecar").start()
    r = router(o, s).start()
    warm = min(5000, args.requests // 10)
    samples: list[tuple[int, int]] = []
    count = [0]

    def on_outcome(_: object) -> None:
        count[0] += 1
        if count[0] % 5000 == 0:
            samples.append((count[0], rss_kib(r.pid)))

    t0 = time.monotonic()
    await run_many(
        r.url, bodies(warm, args.seed, 0.2), concurrency=args.concurrency, deadline_s=30.0
    )
    rss_warm = rss_kib(r.pid)
    fds_warm = open_fds(r.pid)
    tally = await run_many(
        r.url,
        bodies(args.requests, args.seed + 1, 0.2),
        concurrency=args.concurrency,
        deadline_s=30.0,
        on_outcome=on_outcome,
    )
    rss_end = rss_kib(r.pid)
    out = {
        "scenario": "soak",
        "warmup_requests": warm,
        "elapsed_s": round(time.monotonic() - t0, 1),
        **tally.summary(),
        "rss_kib_after_warmup": rss_warm,
        "rss_kib_end": rss_end,
        "rss_growth_pct": round(100.0 * (rss_end - rss_warm) / rss_warm, 2),
        "rss_samples_kib": samples,
        "fds": [fds_warm, open_fds(r.pid)],
        **log_problems(r),
    }
    for c in (r, o, s):
        c.stop()
    return out


RUNS = {"chaos": chaos, "disconnects": disconnects, "load": load, "soak": soak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", choices=sorted(RUNS))
    ap.add_argument("--requests", type=int, default=10_000, help="chaos / soak requests")
    ap.add_argument("--clients", type=int, default=1000, help="disconnects: clients")
    ap.add_argument("--streams", type=int, default=512, help="load: concurrent streams")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=1500, help="hard stop for the run")
    ap.add_argument("--out", help="also write the JSON summary to this file")
    args = ap.parse_args()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(RUNS[args.run](args), args.max_seconds)

    # Children are in our process group only as long as we live: kill them if we are stopped.
    try:
        result = asyncio.run(bounded())
    except asyncio.TimeoutError:
        result = {"scenario": args.run, "error": f"stopped after {args.max_seconds} s"}
    finally:
        _kill_children()
    result.update(
        date=started, machine=machine_line(), command=command_line(), loadavg=os.getloadavg()
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    bad = result.get("lost", 0) + result.get("hung", 0) + result.get("malformed", 0)
    return 1 if bad or result.get("router_5xx") or "error" in result else 0


def _kill_children() -> None:
    """Stop any child process still running (a run cut short by --max-seconds)."""
    for pid in _child_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _child_pids() -> list[int]:
    me = str(os.getpid())
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/stat").read_text().split(") ", 1)[1].split()[1] == me:
                    out.append(int(d))
            except (OSError, IndexError):
                pass
    return out


if __name__ == "__main__":
    sys.exit(main())
