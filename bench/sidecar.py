"""Sidecar benchmark: our sidecar vs ``mlx_lm.server``, and plain vs TurboQuant KV cache.

Every server runs as its own process on a free loopback port, serving the same model
directory (a float32 copy, made once with ``mlx_lm convert --dtype float32``, so neither
server pays for fp16 matmuls on a CPU). Each gets one warm-up request, then one measured
streamed ``/v1/completions`` request: the same long prompt, greedy, ending in a counting
sequence so that neither server stops early. Measured from the client:

- TTFT: request sent -> first streamed text (prompt processing + first token);
- decode tok/s: (completion tokens - 1) / (last text - first text);
- KV bytes: the largest per-request fp16-equivalent / actual bytes our /health reported
  while the request ran (mlx_lm.server reports none).

On a CPU the absolute numbers are slow and noisy: read the ratios (same run, same machine).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
    python -m bench.sidecar --prompt-tokens 1024 --max-tokens 48
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.report import markdown_table, write_section

REPO = Path(__file__).resolve().parent.parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
PARAGRAPH = (
    "The committee met in the old library to review the harbour plans. Each member read "
    "the survey of the tides, the cost of dredging and the letters from the fishermen. "
)


@dataclass
class Result:
    """One measured request against one server configuration."""

    name: str
    ttft_s: float = 0.0
    decode_tps: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kv_fp16_bytes: int = 0
    kv_actual_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if os.path.exists(OPENBLAS) and "libopenblas" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = OPENBLAS
    env.update(extra)
    return env


def float32_copy(model_dir: Path) -> Path:
    """A float32 copy of ``model_dir`` next to it (made once), served by both servers."""
    out = model_dir.parent / f"{model_dir.name}-f32"
    if not (out / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mlx_lm",
                "convert",
                "--hf-path",
                str(model_dir),
                "--mlx-path",
                str(out),
                "--dtype",
                "float32",
            ],
            check=True,
            env=child_env(),
        )
    return out


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def make_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of prose, ending where a model keeps counting."""
    words_per_paragraph = len(PARAGRAPH.split())
    n = max(1, round(tokens / (words_per_paragraph * 1.25)))
    numbers = ", ".join(str(i) for i in range(1, 9))
    return PARAGRAPH * n + f"\nThe members counted the boats: {numbers},"


def _stream(base: str, body: dict) -> tuple[float | None, float | None, int, dict]:
    """One streamed completion: (first text time, last text time, pieces, usage)."""
    first = last = None
    pieces, usage = 0, {}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            if obj.get("choices") and obj["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                pieces += 1
    return first, last, pieces, usage


def measure(name: str, base: str, prompt: str, max_tokens: int, poll_health: bool) -> Result:
    """Warm up, time one streamed completion, then (ours) read its KV size in a second run.

    The timed request runs with nothing else touching the server: polling /health during it
    would cost our server CPU that mlx_lm.server never spends.
    """
    res = Result(name)
    warm = {"prompt": "Hello there, how", "max_tokens": 2, "temperature": 0}
    httpx.post(base + "/v1/completions", json=warm, timeout=300).raise_for_status()
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, last, pieces, usage = _stream(base, body)
    if first is None or last is None:
        raise RuntimeError(f"{name}: no text streamed")
    res.prompt_tokens = usage.get("prompt_tokens", 0)
    res.completion_tokens = usage.get("completion_tokens", 0)
    res.ttft_s = first - t0
    n = res.completion_tokens or pieces
    res.decode_tps = (n - 1) / (last - first) if last > first and n > 1 else 0.0
    if not poll_health:
        return res

    done = threading.Event()
    peak = {"fp16": 0, "actual": 0}

    def watch() -> None:
        while not done.is_set():
            try:
                for r in httpx.get(base + "/health", timeout=2).json().get("requests", []):
                    peak["fp16"] = max(peak["fp16"], r.get("kv_fp16_equivalent_bytes", 0))
                    peak["actual"] = max(peak["actual"], r.get("kv_actual_bytes", 0))
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _stream(base, {**body, "cache_prompt": False})  # a fresh prefill, as in the timed run
    finally:
        done.set()
        watcher.join(5)
    res.kv_fp16_bytes, res.kv_actual_bytes = peak["fp16"], peak["actual"]
    return res


def run_ours(name: str, model: Path, prompt: str, max_tokens: int, **env: str) -> Result:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="bench-sidecar-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.sidecar"],
        cwd=REPO,
        stdout=log,
        stderr=log,
        env=child_env(
            SIDECAR_MODEL=str(model),
            SIDECAR_PORT=str(port),
            SIDECAR_HOST="127.0.0.1",
            TQSTACK_CONFIG=str(REPO / ".cache" / "no-config.env"),
            **env,
        ),
    )
    try:
        wait_ready(base + "/health", proc)
        return measure(name, base, prompt, max_tokens, poll_health=True)
    finally:
        stop(proc)


def run_mlx_server(model: Path, prompt: str, max_tokens: int) -> Result:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="bench-mlxserver-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        cwd=REPO,
        stdout=log,
        stderr=log,
        env=child_env(),
    )
    try:
        # Its /health says ok before the model is loaded: wait for /v1/models instead.
        wait_ready(base + "/v1/models", proc)
        return measure("mlx_lm.server (plain cache)", base, prompt, max_tokens, poll_health=False)
    finally:
        stop(proc)


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}" if n else "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="model directory (default: converted SmolLM2)")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs alone")
    args = ap.parse_args(argv)

    model = args.model
    if model is None:
        from services.models.embedded import ensure_model

        model = ensure_model("smollm2-135m-instruct", REPO / ".cache" / "models")
    model = float32_copy(Path(model))
    prompt = make_prompt(args.prompt_tokens)

    load_before = os.getloadavg()[0]
    results = [run_mlx_server(model, prompt, args.max_tokens)]
    results.append(
        run_ours(
            "tqstack sidecar, plain cache (TQ_ENABLED=0)",
            model,
            prompt,
            args.max_tokens,
            TQ_ENABLED="0",
        )
    )
    results.append(
        run_ours(
            "tqstack sidecar, TurboQuant 4-bit",
            model,
            prompt,
            args.max_tokens,
            TQ_ENABLED="1",
            TQ_KV_BITS="4",
        )
    )
    results.append(
        run_ours(
            "tqstack sidecar, TurboQuant 8-bit",
            model,
            prompt,
            args.max_tokens,
            TQ_ENABLED="1",
            TQ_KV_BITS="8",
        )
    )

    ref, plain = results[0], results[1]
    rows = []
    for r in results:
        rows.append(
            [
                r.name,
                r.prompt_tokens,
                r.completion_tokens,
                f"{r.ttft_s:.2f}",
                f"{r.decode_tps:.2f}",
                f"{ref.ttft_s / r.ttft_s:.2f}x" if r.ttft_s else "n/a",
                f"{r.decode_tps / ref.decode_tps:.2f}x" if ref.decode_tps else "n/a",
                f"{r.decode_tps / plain.decode_tps:.2f}x" if plain.decode_tps else "n/a",
                mib(r.kv_fp16_bytes),
                mib(r.kv_actual_bytes),
            ]
        )
    table = markdown_table(
        [
            "server",
            "prompt tok",
            "completion tok",
            "TTFT s",
            "decode tok/s",
            "TTFT speed vs mlx_lm.server",
            "decode vs mlx_lm.server",
            "decode vs plain cache",
            "KV fp16-equiv MiB",
            "KV actual MiB",
        ],
        rows,
    )
    body = (
        f"Model: `{model.name}` (float32 copy, both servers). One streamed `/v1/completions` "
        f"request per server after one warm-up, greedy, {args.prompt_tokens}-token target "
        f"prompt, {args.max_tokens} new tokens; every server a separate process over "
        "loopback HTTP. TTFT speed > 1 means faster than mlx_lm.server. KV columns: the "
        "largest per-request cache our `/health` reported during a second, untimed run of the "
        "same request (so no /health polling touches the timed one; the plain "
        "cache holds the model's float32 keys/values, so its actual bytes are 2x the fp16 "
        f"equivalent). Load average (1 min) before/after: {load_before:.1f}/"
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: ratios "
        "within one run are what to read).\n\n" + table
    )
    print(body)
    if not args.no_write:
        cmd = "python -m bench.sidecar " + " ".join(argv if argv is not None else sys.argv[1:])
        if "libopenblas" in os.environ.get("LD_PRELOAD", ""):
            cmd = f"LD_PRELOAD={os.environ['LD_PRELOAD']} {cmd}"
        title = "Sidecar: tqstack vs mlx_lm.server, plain vs TurboQuant cache"
        write_section("sidecar", title, body, command=cmd.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
