"""Compile the CUDA decode kernels a model will launch before a request needs them.

A layer's launch plan picks among a few kernel variants as a generation goes on: the
full-precision tail holding positions or not, a step's new position written by the kernel
(``cache.TailAppend``, the tail buffer whole: TLEN) with its RoPE applied by the kernel or
not (rope_fusion: only past ``SMALL_INTS`` positions), and one launch or two (the fused
join stops at ``mma_decode.FUSED_MAX_WORK`` / ``FUSED_MAX_TAIL``: Llama-3.1-8B at 64K,
Qwen3.5's layers near 4K). MLX compiles each variant on its first launch (NVRTC: seconds),
so without this the compile lands inside a user's generation (bench/gpu_notes.md, session
17: a step of seconds when a Qwen3.5 layer went from one launch to two).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..rope_fusion import SMALL_INTS, kernel_takes_rope
from . import mma_decode

DECODE_STEPS = 4  # generated tokens a warm-up run takes (see warm_prompt_len)


def warm_prompt_len(block: int, sink_tokens: int, window: int, center_positions: int) -> int:
    """Prompt positions after which ``DECODE_STEPS`` tokens reach every tail variant.

    ``generate_step`` prefills all but the prompt's last position, then runs that one as a
    one-query step. With blocks of ``block`` positions (per-channel keys) the tail then
    holds ``window + block - 3`` positions, so the steps are: the last prompt position (a
    new tail buffer: the tail cut, no append), the first token (the kernel appends: TLEN),
    the second (a block leaves the tail: no tail), the third (a new buffer again). With one
    position a block the tail never defers; past the key centre's positions is enough.
    """
    if block > 2:
        return sink_tokens + window + 2 * block - 2
    return sink_tokens + window + center_positions + 6


def warm_prompt_lens(block: int, sink_tokens: int, window: int, center_positions: int,
                     rope: bool) -> list[int]:  # fmt: skip
    """:func:`warm_prompt_len`, and with ``rope`` (the layer kernel applies a deferred RoPE)
    as many blocks more as put its appending step past ``rope_fusion.SMALL_INTS``
    positions, where the RoPE variants take over (below, the plain ones serve)."""
    first = n = warm_prompt_len(block, sink_tokens, window, center_positions)
    if rope and block > 2:  # (one position a block: no step defers its write)
        while n <= SMALL_INTS + 2:
            n += block
    return [first] if n == first else [first, n]


def warm_decode_kernels(run: Callable[[int, int], None], prompt_lens: list[int]) -> None:
    """``run(n, DECODE_STEPS)`` -- a generation through fresh caches of the model -- for each
    prompt length ``n``, once with the module's join settings and once with two launches a
    layer, so both plans' kernels are built (plans and kernels stay cached for the process)."""
    saved = mma_decode.FUSED_JOIN
    try:
        for fused in (saved, False) if saved else (False,):
            mma_decode.FUSED_JOIN = fused
            for n in prompt_lens:
                run(n, DECODE_STEPS)
    finally:
        mma_decode.FUSED_JOIN = saved


def warm_model(model: Any, make_cache: Callable[[], list], config: Any, ids: list[int]) -> None:
    """Build the decode kernels ``model`` reaches with caches from ``make_cache`` (the
    TurboQuant ``config`` they use): synthetic generations of a prompt of ``ids`` repeated."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from ..cache import TurboQuantKVCache

    probe = TurboQuantKVCache(config)
    lens = warm_prompt_lens(probe.block, probe.sink_tokens, probe.window,
                            probe.CENTER_POSITIONS, kernel_takes_rope())  # fmt: skip
    n = max(lens)
    prompt = (ids * (n // len(ids) + 1))[:n]

    def run(n_prompt: int, steps: int) -> None:
        gen = generate_step(mx.array(prompt[:n_prompt]), model, max_tokens=steps,
                            prompt_cache=make_cache())  # fmt: skip
        for _ in gen:
            pass

    warm_decode_kernels(run, lens)
