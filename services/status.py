"""``tqstack-status``: both backends, the model, routing threshold and memory at a glance.

Asks the router, the sidecar and Ollama over HTTP (each on its own, so a dead router does not
hide a live sidecar) and prints one screen. Exit status: 0 when the router answers and can serve, 1
when it is down, 2 when it answers but no backend is up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from services.config import Settings, load_settings

MIB = 1024 * 1024


def _get_json(client: httpx.Client, url: str) -> tuple[int | None, Any]:
    """(status code, parsed body) of GET url; (None, error text) when nothing answers."""
    try:
        r = client.get(url)
    except httpx.HTTPError as e:
        return None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text[:200]


def _system_memory() -> dict[str, int]:
    """Total (and on Linux available) physical memory in bytes."""
    out: dict[str, int] = {}
    try:
        out["total"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    out["available"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _services(home: Path) -> dict[str, Any]:
    """How the installed services are managed, and the pids of detached ones."""
    run = home / "run"
    info: dict[str, Any] = {"mode": None, "pids": {}}
    try:
        info["mode"] = (run / "service-mode").read_text().strip() or None
    except OSError:
        return info
    for svc in ("router", "sidecar"):
        try:
            pid = int((run / f"{svc}.pid").read_text().strip())
            os.kill(pid, 0)
            info["pids"][svc] = pid
        except (OSError, ValueError):
            pass
    return info


def gather(settings: Settings, *, router_url: str | None = None, timeout: float = 2.0) -> dict:
    """Collect the state of router, sidecar, Ollama, memory and services into one dict."""
    router = (router_url or f"http://127.0.0.1:{settings.router_port}").rstrip("/")
    report: dict[str, Any] = {"config": str(_config_path()), "router_url": router}
    with httpx.Client(timeout=timeout) as c:
        code, body = _get_json(c, f"{router}/health")
        # A 503 from /health means "no backend is up", not "router down": the router answered.
        answered = code is not None and isinstance(body, dict) and "backends" in body
        report["router"] = {"up": answered, "serving": code == 200, "code": code, "health": body}
        code, body = _get_json(c, f"{settings.sidecar_base_url}/health")
        report["sidecar"] = {
            "url": settings.sidecar_base_url,
            "up": code == 200,
            "loading": code == 503,
            "code": code,
            "health": body,
        }
        ollama = settings.ollama_base_url
        code, version = _get_json(c, f"{ollama}/api/version")
        _, ps = _get_json(c, f"{ollama}/api/ps") if code == 200 else (None, None)
        report["ollama"] = {
            "url": ollama,
            "up": code == 200,
            "version": version.get("version") if isinstance(version, dict) else None,
            "loaded": [
                {"name": m.get("name"), "size": m.get("size"), "size_vram": m.get("size_vram")}
                for m in (ps or {}).get("models") or []
            ]
            if isinstance(ps, dict)
            else [],
            "model": settings.ollama_model,
        }
    report["memory"] = _system_memory()
    report["memory_saver"] = settings.memory_saver
    report["services"] = _services(settings.tqstack_home.expanduser())
    return report


def _config_path() -> Path:
    from services.config import default_config_path

    return default_config_path()


def _mb(n: Any) -> str:
    return f"{n / MIB:,.1f} MB" if isinstance(n, int | float) else "?"


def _gb(n: Any) -> str:
    return f"{n / 1024**3:.1f} GB" if isinstance(n, int | float) else "?"


def _kv_line(sh: dict) -> str | None:
    """One line about the sidecar's KV cache: kind, bits, layers, bytes per token."""
    cache = sh.get("cache") if isinstance(sh.get("cache"), dict) else {}
    layers = sh.get("compressed_layers")
    if cache.get("turboquant") is False:
        kind = "plain mlx-lm cache (TQ_ENABLED=0)"
    elif cache:
        kind = (
            f"TurboQuant {cache.get('quantizer', '?')} K{cache.get('key_bits', '?')}"
            f"/V{cache.get('value_bits', '?')} bits"
        )
        if cache.get("group_size"):
            kind += f", group {cache['group_size']}"
    else:
        kind = "KV cache"
    parts = [kind]
    if isinstance(layers, list) and cache.get("turboquant") is not False:
        total = sh.get("num_layers")
        parts.append(f"{len(layers)}{f'/{total}' if total else ''} layers compressed")
    fp16, actual = cache.get("kv_bytes_per_token_fp16"), cache.get("kv_bytes_per_token_actual")
    if cache.get("turboquant") is False and isinstance(actual or fp16, int):
        parts.append(f"{actual or fp16:,} B/token")
    elif isinstance(fp16, int) and isinstance(actual, int) and actual:
        parts.append(f"{actual:,} B/token vs {fp16:,} fp16 ({fp16 / actual:.2f}x smaller)")
    return "         KV cache: " + ", ".join(parts)


def _sidecar_details(sh: dict) -> list[str]:
    """Lines under the sidecar's UP line: cache, requests (with their KV bytes), memory."""
    lines = [_kv_line(sh)]
    reqs = [r for r in sh.get("requests") or [] if isinstance(r, dict)]
    line = (
        f"         requests: {sh.get('active_requests', 0)} active, "
        f"{sh.get('queued_requests', 0)} queued"
    )
    actual = sum(r.get("kv_actual_bytes") or 0 for r in reqs)
    fp16 = sum(r.get("kv_fp16_equivalent_bytes") or 0 for r in reqs)
    if actual:
        line += f"; their KV cache holds {_mb(actual)} (fp16 would be {_mb(fp16)})"
    lines.append(line)
    mem = sh.get("memory")
    if isinstance(mem, dict) and mem:
        # Byte counts in MB; anything else (entry counts) as it is.
        shown = [
            f"{k.removesuffix('_bytes')} {_mb(v)}" if k.endswith("_bytes") else f"{k} {v}"
            for k, v in mem.items()
            if v is not None
        ]
        lines.append("         memory: " + ", ".join(shown))
    return [ln for ln in lines if ln]


def render(report: dict) -> str:
    """The one-screen text view of :func:`gather`'s report."""
    lines = [f"tqstack status   (config: {report['config']})"]
    r = report["router"]
    rh = r["health"] if isinstance(r["health"], dict) else {}
    if r["up"]:
        threshold = rh.get("prompt_token_threshold", "?")
        source = rh.get("threshold_source")
        lines.append(
            f"router   UP     {report['router_url']}   auto-routing threshold: {threshold} tokens"
            + (f" ({source})" if source else "")
        )
        ctx = rh.get("context_lengths")
        if isinstance(ctx, dict) and ctx:
            # {"ollama": {tag: n, ...}, "sidecar": n}: one "name n" per known model.
            parts = []
            for backend, v in ctx.items():
                if isinstance(v, dict):
                    parts += [f"{backend}:{tag} {n}" for tag, n in v.items() if n]
                elif v:
                    parts.append(f"{backend} {v}")
            if parts:
                lines.append("         context lengths: " + ", ".join(parts))
        backends = rh.get("backends") if isinstance(rh.get("backends"), dict) else {}
        if backends:
            seen = ", ".join(
                f"{name} {b.get('state', '?')}"
                for name, b in backends.items()
                if isinstance(b, dict)
            )
            lines.append(
                f"         status {rh.get('status', '?')}; backends as it sees them: {seen}"
            )
    else:
        why = r["health"] if r["code"] is None else f"HTTP {r['code']}"
        lines.append(f"router   DOWN   {report['router_url']}   ({why})")

    s = report["sidecar"]
    sh = s["health"] if isinstance(s["health"], dict) else {}
    if s["up"]:
        lines.append(
            f"sidecar  UP     {s['url']}   model {sh.get('model', '?')}"
            f" ({sh.get('architecture', '?')}), context {sh.get('context_length', '?')}"
        )
        lines += _sidecar_details(sh)
    elif s["loading"]:
        lines.append(f"sidecar  LOADING {s['url']}   (model still loading)")
    else:
        why = s["health"] if s["code"] is None else f"HTTP {s['code']}"
        lines.append(f"sidecar  DOWN   {s['url']}   ({why})")

    o = report["ollama"]
    if o["up"]:
        loaded = ", ".join(f"{m['name']} ({_gb(m['size'])})" for m in o["loaded"]) or "none"
        lines.append(
            f"ollama   UP     {o['url']}   version {o['version']}, default model {o['model']}, "
            f"loaded: {loaded}"
        )
    else:
        lines.append(f"ollama   DOWN   {o['url']}   (optional: the sidecar serves everything)")

    m = report["memory"]
    mem = f"{_gb(m.get('total'))} total"
    if "available" in m:
        mem += f", {_gb(m['available'])} available"
    lines.append(f"memory   {mem}; memory saver: {report['memory_saver']}")
    svc = report["services"]
    if svc["mode"]:
        pids = ", ".join(f"{k} pid {v}" for k, v in svc["pids"].items())
        lines.append(f"services {svc['mode']}" + (f" ({pids})" if pids else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the status; exit 1 when the router is down, 2 when it has no backend."""
    p = argparse.ArgumentParser(prog="tqstack-status", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the raw report as JSON")
    p.add_argument("--url", help="router base URL (default: http://127.0.0.1:$ROUTER_PORT)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per HTTP check")
    args = p.parse_args(argv)
    report = gather(load_settings(), router_url=args.url, timeout=args.timeout)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    if not report["router"]["up"]:
        return 1
    return 0 if report["router"]["serving"] else 2


if __name__ == "__main__":
    sys.exit(main())
