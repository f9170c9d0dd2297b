"""The sidecar's kernel warm-up on a GPU: what it builds, and that a generation afterwards
builds nothing (no NVRTC compile inside a request). A small random-weight Llama with head
dim 128 (2 layers), the TurboQuant cache as the sidecar makes it, its layers going from one
launch to two mid-generation (--switch-at)::

    python3 bench/warm_gpu.py --out DIR    # prints, and DIR/warm_gpu.json
    python3 bench/warm_gpu.py --no-warm    # the same generation without the warm-up

Run each with a fresh ``MLX_PTX_CACHE_DIR`` (MLX keeps compiled kernels on disk). Then here:
``--render A.json,B.json --machine ... --command ...`` writes the docs/benchmarks.md section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def render(paths: str, machine: str | None, command: str | None, note: str = "") -> str:
    """The kernel_warmup section of docs/benchmarks.md from warm_gpu.json files."""
    from bench.report import markdown_table, write_section

    rows = []
    for p in paths.split(","):
        r = json.loads(Path(p).read_text())
        rows.append(["warm-up first" if r["warm"] else "no warm-up", f"{r['warm_s']:.1f}",
                     r["kernels_after_warm"], r["kernels_after_generation"] - r["kernels_after_warm"],
                     f"{r['slowest_step_ms']:.1f}", f"{r['median_step_ms']:.2f}"])  # fmt: skip
    head = ["run", "warm-up s", "kernels built in it", "built during the generation",
            "slowest step ms", "median step ms"]  # fmt: skip
    body = (note + "\n\n" if note else "") + markdown_table(head, rows)
    write_section("kernel_warmup", "Decode kernels built before the first request",
                  body, machine=machine, command=command)  # fmt: skip
    return body


def main() -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama

    from bench.report import add_section_args
    from services.sidecar.kv import KVBackend
    from services.turboquant import TurboQuantConfig, install_patch
    from services.turboquant.kernels import dispatch, jit, mma_decode, warm

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/warm_gpu")
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument(
        "--switch-at",
        type=int,
        default=1100,
        help="body positions past which the generation's layers take two launches "
        "(FUSED_MAX_WORK lowered: the mid-decode plan change of a long context)",
    )
    ap.add_argument("--no-warm", action="store_true", help="the generation alone (its compiles)")
    add_section_args(ap, "warm_gpu.json files: write the docs section, run nothing")
    args = ap.parse_args()
    if args.render:
        print(render(args.render, args.machine, args.command, args.note))
        return
    install_patch()
    dispatch.install()
    args_model = llama.ModelArgs(model_type="llama", hidden_size=1024, num_hidden_layers=2,
                                 intermediate_size=2048, num_attention_heads=8,
                                 num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512)  # fmt: skip
    model = llama.Model(args_model)
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    backend = KVBackend(model=model, turboquant=True, tq_config=TurboQuantConfig.recommended())
    t = time.perf_counter()
    if not args.no_warm:
        warm.warm_model(model, backend.make_cache, backend.tq_config, [1, 2, 3, 4, 5])
    warm_s = time.perf_counter() - t
    built = jit.baked_kernel.cache_info().currsize
    mma_decode.FUSED_MAX_WORK = 2 * 128 * args.switch_at  # batch 1 x 2 KV heads x dim 128
    cache = backend.make_cache()
    prompt = mx.array([(7 * i) % 500 + 1 for i in range(args.prompt)])
    steps, last = [], time.perf_counter()
    for _ in generate_step(prompt, model, max_tokens=args.steps, prompt_cache=cache):
        now = time.perf_counter()
        steps.append(now - last)
        last = now
    res = dict(mlx=mx.__version__, warm=not args.no_warm, warm_s=round(warm_s, 2), kernels_after_warm=built,
               kernels_after_generation=jit.baked_kernel.cache_info().currsize,
               slowest_step_ms=round(max(steps[1:]) * 1e3, 2),
               median_step_ms=round(sorted(steps)[len(steps) // 2] * 1e3, 2))  # fmt: skip
    print(json.dumps(res))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warm_gpu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
