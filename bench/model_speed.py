"""Prompt and decode speed of the embedded models per weight dtype, with/without OpenBLAS.

Backs the launchers' choice (float32 weights + a preloaded system OpenBLAS on Linux CPU)
with a measurement. Each configuration runs in its own child process because LD_PRELOAD
only takes effect at process start. Writes section ``model_speed`` of docs/benchmarks.md.

    .venv/bin/python -m bench.model_speed [--models smollm2-135m-instruct gemma3-270m]
        [--prompt-tokens 256] [--decode-tokens 32] [--repeats 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
)


def find_openblas() -> str | None:
    """Path of a system OpenBLAS to preload, if one is installed."""
    return next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)


def _prompt_ids(tok, n: int) -> list[int]:
    # Stable English prose shipped with CPython; content does not affect speed, length does.
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok.encode(text)
    return ids[:n]


def measure(model_dir: str, dtype: str, prompt_tokens: int, decode_tokens: int, repeats: int):
    """Best-of-``repeats`` prompt and decode tokens/s for one model and weight dtype."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = load(model_dir)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    ids = _prompt_ids(tok, prompt_tokens)
    best_prompt = best_decode = 0.0
    for round_ in range(repeats + 1):  # the first round warms up kernels and is discarded
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        logits = model(mx.array([ids]), cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(token)
        t1 = time.perf_counter()
        # Fidelity of this dtype: mean NLL of the prompt's next tokens (compare with float32).
        nll = nn.losses.cross_entropy(logits[0, :-1].astype(mx.float32), mx.array(ids[1:]))
        nll = float(nll.mean())
        # Greedy steps ignoring EOS, so every configuration decodes the same count.
        for _ in range(decode_tokens):
            logits = model(token[:, None], cache=cache)
            token = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval(token)
        t2 = time.perf_counter()
        if round_ > 0 or repeats == 0:
            best_prompt = max(best_prompt, len(ids) / (t1 - t0))
            best_decode = max(best_decode, decode_tokens / (t2 - t1))
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    return {
        "prompt_tps": best_prompt,
        "decode_tps": best_decode,
        "prompt_tokens": len(ids),
        "nll": nll,
        "openblas_loaded": "libopenblas" in maps,
        "device": str(mx.default_device()),
    }


def run_child(
    model_dir: str, dtype: str, preload: str | None, args, extra_env: dict[str, str]
) -> dict:
    """Run :func:`measure` in a fresh process with or without the OpenBLAS preload."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.pop("OPENBLAS_NUM_THREADS", None)
    env.update(extra_env)
    if preload:
        env["LD_PRELOAD"] = preload
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, __file__, "--child", model_dir, dtype,
        "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({model_dir}, {dtype}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run every configuration and write the table (unless --no-write)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    p.add_argument(
        "--models-dir", default=None, help="default: $TQSTACK_TEST_MODELS_DIR or .cache/models"
    )
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    if args.child:
        res = measure(
            args.child[0], args.child[1], args.prompt_tokens, args.decode_tokens, args.repeats
        )
        print(json.dumps(res))
        return 0

    sys.path.insert(0, str(REPO))  # run as a script as well as with -m
    from bench.report import markdown_table, write_section
    from services.models.embedded import ensure_model

    models_dir = Path(
        args.models_dir or os.environ.get("TQSTACK_TEST_MODELS_DIR") or REPO / ".cache" / "models"
    )
    blas = find_openblas()
    # (weights dtype, preload, extra environment, label, first model only)
    configs = [
        ("float32", blas, {}, "float32 + OpenBLAS preload", False),
        ("float32", blas, {"OPENBLAS_NUM_THREADS": "1"}, "float32 + OpenBLAS, 1 thread", True),
        ("float32", None, {}, "float32, wheel's BLAS", True),
        ("bfloat16", blas, {}, "bfloat16", False),
        ("float16", blas, {}, "float16", False),
    ]
    if blas is None:
        configs = [c for c in configs if "OpenBLAS" not in c[3]]
        print("no system OpenBLAS found: measuring without the preload only", file=sys.stderr)

    load_before = os.getloadavg()[0]
    rows, baseline = [], {}
    for i, name in enumerate(args.models):
        model_dir = str(ensure_model(name, models_dir, progress=False))
        # The float32 variants once (first model) are enough to show the gap.
        for dtype, preload, extra_env, label, first_only in configs:
            if first_only and i > 0:
                continue
            res = run_child(model_dir, dtype, preload, args, extra_env)
            key = (name, "ref")
            baseline.setdefault(key, res)  # the first configuration of a model is the reference
            ref = baseline[key]
            rows.append(
                [
                    name, label, "yes" if res["openblas_loaded"] else "no",
                    f"{res['prompt_tps']:.1f}", f"{res['decode_tps']:.1f}",
                    f"{res['prompt_tps'] / ref['prompt_tps']:.2f}",
                    f"{res['decode_tps'] / ref['decode_tps']:.2f}",
                    f"{res['nll']:.4f}", f"{res['nll'] - ref['nll']:+.4f}",
                ]
            )  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)

    headers = ["model", "weights", "OpenBLAS loaded", "prompt tok/s", "decode tok/s",
               "prompt vs first row", "decode vs first row", "prompt NLL", "ΔNLL"]  # fmt: skip
    body = (
        f"Prompt of {args.prompt_tokens} tokens (CPython `pydoc_data` prose), then "
        f"{args.decode_tokens} greedy decode steps; best of {args.repeats} after one warm-up, "
        f"each configuration in its own process (LD_PRELOAD acts at start). "
        f"Device: {res['device']}. Load average (1 min) {load_before:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} cores: absolute figures on a "
        "shared CPU are noisy, read the ratios, measured in one run.\n\n"
        + markdown_table(headers, rows)
        + "\nNLL: mean next-token negative log-likelihood over the prompt, from the same prefill; "
        "ΔNLL against the model's first row (float32), i.e. what the weight dtype costs in "
        "quality.\n"
        + "\nDecode steps are matrix-vector products bound by memory traffic, so fewer bytes per "
        "weight can win decode even without BLAS (Gemma reads its 262144 x 640 tied embedding "
        "every token); under heavy load (see load average) multi-threaded OpenBLAS also loses "
        "time to oversubscription.\n"
        + "\nWhy the launcher preloads OpenBLAS and casts to float32 on Linux CPU: the `mlx[cpu]` "
        "wheel's bundled BLAS is slow, and bf16/fp16 matmuls never use BLAS.\n"
    )
    if not args.no_write:
        cmd = " ".join([".venv/bin/python -m bench.model_speed", *(argv or sys.argv[1:])])
        write_section(
            "model_speed", "Embedded model speed by weight dtype (CPU)", body, command=cmd
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
