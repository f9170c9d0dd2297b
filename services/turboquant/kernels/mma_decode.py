"""Tensor-core decode attention over a packed body (CUDA; source in mma_source.py; the
versions and their measurements: bench/gpu_notes.md).

:func:`mma_decode_layer` is a whole decode layer over a :class:`PackedSide` pair --
per-vector affine or codebook keys, or the default per-channel keys: the split kernel over
the quantized body (the last blocks of its grid take the full-precision sink and tail, in
chunks of 16 positions), then one join launch (splits, rotation back, the fp partials,
learned sinks). :func:`mma_body_attention` returns the body's normalised output and base-2
log-sum-exp instead, for ``attention.join_body``. Import-safe everywhere; kernels build on
first CUDA call.
"""

from __future__ import annotations

import math
import sys
import types
from functools import lru_cache
from operator import itemgetter

import mlx.core as mx

from ..attention import centre_shift2
from ..cache import JOIN_COUNTER_ROWS
from ..rope_fusion import PendingRope, RopeSpec, as_array
from ..rotation import rotate
from .fused_decode import (
    LOG2E,
    NUM_SMS_GUESS,
    _tail_params,
    const_input,
    device_constant,
    tail_params,
)
from .jit import baked_kernel
from .mma_source import (
    MMA_COMBINE_SOURCE,
    MMA_COMMON,
    MMA_FP_CHUNK,
    MMA_HEADER,
    MMA_JOIN_SOURCE,
    MMA_JOIN_STAGED,
    MMA_SPLIT_SOURCE,
    MMA_WORK_ALIGN,
    compact,
    rope_smem_header,
)

AFFINE_BITS = (2, 3, 4, 8)
CODEBOOK_BITS = (2, 3, 4)
HEAD_DIMS = (64, 128, 256)
WARPS = 4  # warps per block; each owns super-tiles of 16 * steps positions
# Steps of 16 positions per super-tile, measured on the H200 (bench/gpu_notes.md, v4b): 8
# for per-channel keys at head dim <= 128 (a lane then reads whole 4-bit words: 0.142 vs
# 0.240 ms at 128K; v5: 0.103 vs 0.125), 4 elsewhere (fewer registers: 0.135 vs 0.156 ms).
# None: that rule.
STEPS: int | None = None
# Blocks per SM the split count aims for: NVRTC gives the kernel 182-255 registers, so 2
# fit (v5 with 3: 0.109 vs 0.103 ms at 128K).
SPLIT_FACTOR = 2
# The pipelined layout: splits of at least 2 super-tiles a warp up to a block an SM, more
# only where each warp keeps TILES_PER_WARP. Up to 32K a block's fixed costs -- the query's
# rotation while the first tiles load, the warps' merge, a split more to join -- outweigh
# more blocks in flight. H200, fused, D 128, 8 KV heads (bench/split_sweep.py and
# kernel_trace.py, session 14; session 13's sweep the same way): 4K 4 splits 17.6 vs 8 19.1
# us, 16K 16 24.3 (8: 24.0, 32: 27.4; traced 19.0 vs 21.0 for 32), 32K 16 30.5 vs 32 32.5;
# 128K keeps the fill rule's 33. Read when a plan is made: clear_kernel_caches after
# changing it (1: the fill rule alone).
TILES_PER_WARP = 4
# Short contexts inside a model take the fill rule at 3 blocks an SM and one super-tile a
# warp instead: there each block's loads wait longer than in the chained benches (32K,
# kernel_trace marks in Llama decode steps vs alone: query loads 5.6 vs 2.5 us, tiles 20.9
# vs 14.7), so more, shorter splits win. Llama-3.1-8B decode steps, batch 1 (8 rows), ncu,
# session 24: a layer 4K 26.3 vs 34.1 us (8 vs 4 splits), 32K 42.7 vs 44.9 (43 vs 16), but
# 128K 69.6 vs 66.9 -- so only up to SHORT_BODY body positions and SHORT_ROWS rows (48K and
# batch 1's 8 rows: between 32K and 128K, and more rows, not measured). 0: off. Nor where
# its splits would make the row's join merge more than FUSED_MAX_TAIL's default (GQA 8 at
# 32K: 43 x 8 heads x 128): that layer would become two launches, which was not measured.
SHORT_BODY = 49152
SHORT_ROWS = 8
# Multiply exact codes on the tensor cores and fold a tile's scales and biases into the
# other operand: channel keys, values with one group a vector (bench/gpu_notes.md, session
# 4: 0.103 vs 0.117 ms at 128K, 0.177 vs 0.215 at 256K).
FOLD = True
# The default layout at head dim <= 128 stages each warp's tiles in shared memory with
# cp.async, the next half-tile loading during this one's math (template PIPE;
# bench/gpu_notes.md, session 5). False: the v5 loads straight into registers.
PIPELINE = True
# One 1-D grid, every row's splits before the full-precision chunks (template LIN), so the
# hardware gives each SM an even share of split blocks; else (splits + chunks, rows, batch),
# where the chunk blocks interleave with the splits and some SMs get 3 split blocks while
# others get 1 (ncu at 128K: SMs active 69 % of the kernel; bench/gpu_notes.md, session 8).
LINEAR_GRID = True
# The pipelined kernel's value product as a loop over its steps, not unrolled (template
# CVAL): the tile loop's code 2,068 -> 1,446 instructions, ~6 % more executed, and half the
# "no instruction" stalls (H200, ncu at 32K: the unrolled steps missed the instruction
# cache); 32K layer ~-5 % (bench/gpu_notes.md, session 16). Read when a plan is made (tune()).
COMPACT_VALUES = True
# One launch a layer: the split kernel's last block of each row does the join (counters and
# partials in a per-layer workspace, cache.join_workspace), saving a custom-kernel call's
# host work. Only up to FUSED_MAX_WORK key elements (batch x KV heads x body positions x head
# dim; H200, pipelined: fused 0.036 / 0.047 ms vs 0.058 / 0.049 two launches at 32K / 64K,
# but 0.071 vs 0.065 at 128K, where a row's last block joining alone is the longer tail;
# bench/gpu_notes.md session 12) and FUSED_MAX_TAIL floats a row's last block merges
# (splits x the row's heads x head dim: D 256 with 2 KV heads has ~128 splits a row).
FUSED_JOIN = True
FUSED_MAX_WORK: int | None = 8 * 65536 * 128  # None: no limit (nor on the tail)
FUSED_MAX_TAIL = 32 * 8 * 128
_SHORT_MAX_TAIL = FUSED_MAX_TAIL  # (the default: SHORT_BODY's rule keeps such layers one launch)
# The fused join of pipelined launches with its row's partials staged in the idle ring by
# cp.async -- all of a head's splits in flight at once, not rounds of 16 through registers
# (mma_source.MMA_JOIN_STAGED; in the model each round waited ~3.5 us at 32K: session 24).
# H200, Llama-3.1-8B decode steps under ncu: attention a step 4K -11 %, 32K -7 % (step -1.8 /
# -1.5 %); 128K's two-launch layers do not take it (bench/gpu_notes.md, session 25).
JOIN_STAGE = True
# Pipelined launches that apply the query's RoPE read each element's partner back from
# shared memory (no partner loads) and are held at 3 blocks an SM by launch bounds: NVRTC
# gives their tile loop the plain build's form (bench/sass_count.py --rope: 3,330
# instructions a tile, not 3,393 with constants re-loaded). Without RoPE in the kernel our
# 32K launch in the model ran 34.6 us, with it 39.4 (session 26). Not measured on the GPU.
ROPE_SMEM = False
# A layer's plan (split, and join where not fused) and static inputs are kept on its
# JoinWorkspace (_DecodeMemo) and reused while the body views stay the same objects: the
# call then skips the plan's cache lookup and the input lists (host time per layer).
# False: every call plans (tests).
DECODE_MEMO = True
# bench/kernel_trace.py only: fused split kernels built with TQM_TRACE record each block's
# timeline (globaltimer, clock64) as 32 uint64 a block, TRACE_AT floats past the workspace's
# counters (the bench grows the workspace; clear_kernel_caches after setting it).
TRACE_AT: int | None = None
KEY_LAYOUTS = {"affine": 0, "codebook": 1, "channel": 2}
VALUE_LAYOUTS = {"affine": 0, "codebook": 1}


# Sent without comments (the same SASS, checked with nvcc 13 for sm_90): NVRTC reads less.
_COMMON_HEADER = compact(MMA_COMMON)
_SPLIT_HEADER = compact(MMA_HEADER)
_JOIN_STAGED = compact(MMA_JOIN_STAGED)


# kn, vn: a decode step's new positions, written into kt/vt's buffers (cache.TailAppend);
# after: the layer's previous such launch (unread: it orders the launches); rope: the
# RoPE frequencies where the kernel rotates the query and kn by position (rope_fusion)
SPLIT_INPUTS = ("q", "kw", "ks", "kb", "vw", "vs", "vb", "lut_k", "lut_v", "params", "signs",
                "rope", "kh", "vh", "kt", "vt", "kn", "vn", "after", "work", "cshift",
                "sinks")  # fmt: skip
SPLIT_OUTPUTS = ("o_part", "ml_part", "fp_o", "fp_ml", "out")
JOIN_INPUTS = ("o_part", "ml_part", "fp_o", "fp_ml", "signs", "cshift", "sinks")


def _split_kernel(template: tuple, smem: int = 0, fp_dtype: str = "float16"):
    """The split kernel for one template, and which of ``SPLIT_INPUTS`` / ``SPLIT_OUTPUTS``
    it takes (the rest are compiled out and not passed)."""
    t = dict(template)
    used = dict(kb=t["KQ"] != 1, vb=t["VQ"] != 1, lut_k=t["KQ"] == 1, lut_v=t["VQ"] == 1,
                signs=t["QROT"], kh=t["HAS_HEAD"], vh=t["HAS_HEAD"], kt=t["HAS_TAIL"],
                vt=t["HAS_TAIL"], fp_o=t["HAS_HEAD"] or t["HAS_TAIL"], kn=t["APPEND"],
                vn=t["APPEND"], after=t["APPEND"], rope=t["RDIMS"] > 0)  # fmt: skip
    # FUSED: the partials go to the workspace (an input), the joined output is the one output
    used.update(o_part=not t["FUSED"], ml_part=not t["FUSED"])
    used["fp_o"] = used["fp_ml"] = used["fp_o"] and not t["FUSED"]
    used.update(work=t["FUSED"], out=t["FUSED"], cshift=t["HAS_CENTER"], sinks=t["HAS_SINKS"])
    fp = getattr(mx, fp_dtype)
    dtypes = dict(kb=mx.float16, vb=mx.float16, kh=fp, vh=fp, kt=fp, vt=fp, kn=fp, vn=fp,
                  out=t["OT"])  # fmt: skip
    # fp_dtype: the sink's and tail's dtype, which types inputs kh..vt in the signature MLX
    # writes but is no template argument: in the name, or one build would serve both.
    name = f"tq_mma_decode_split_{fp_dtype}"
    # strided: the cache's views are read through their strides, never copied
    header = _SPLIT_HEADER
    if t.get("JSTG"):
        header += _JOIN_STAGED
    if t.get("RSMEM"):  # (12 warps an SM: the pipelined builds were measured at 3 blocks of 4)
        header = rope_smem_header(header, 32 * t["WARPS"], max(1, 12 // t["WARPS"]))
    if TRACE_AT is not None and t["FUSED"]:
        header = f"#define TQM_TRACE {TRACE_AT}\n" + header
    return _planned_kernel(name, SPLIT_INPUTS, SPLIT_OUTPUTS, MMA_SPLIT_SOURCE, header,
                           template, True, smem, used, dtypes)  # fmt: skip


def _planned_kernel(name, inputs, outputs, source, header, template, strided, smem, used, dtypes):
    """``(kernel, kept inputs, kept outputs)``: the kernel declares only the inputs and
    outputs ``used`` does not mark False (the others become null pointers in its body);
    ``dtypes``: of the dropped ones, float32 if not given."""
    absent = tuple(
        (n, dtypes.get(n, mx.float32), n in outputs)
        for n in inputs + outputs
        if not used.get(n, True)
    )
    kept = tuple(i for i, n in enumerate(inputs) if used.get(n, True))
    kept_out = tuple(i for i, n in enumerate(outputs) if used.get(n, True))
    kernel = baked_kernel(name, tuple(inputs[i] for i in kept), tuple(outputs[i] for i in kept_out),
                          source, header, template, strided, smem, absent)  # fmt: skip
    return kernel, kept, kept_out


def _combine_kernel(d: int):
    return baked_kernel("tq_mma_decode_combine", ("o_part", "ml_part"), ("out", "lse"),
                        MMA_COMBINE_SOURCE, _COMMON_HEADER, (("D", d),), False)  # fmt: skip


def _join_kernel(template: tuple):
    """The join for one template, with what it takes (as :func:`_split_kernel`)."""
    t = dict(template)
    used = dict(fp_o=t["HAS_FP"], fp_ml=t["HAS_FP"], signs=t["HAS_ROT"], cshift=t["HAS_CENTER"],
                sinks=t["HAS_SINKS"])  # fmt: skip
    return _planned_kernel("tq_mma_decode_join", JOIN_INPUTS, ("out",), MMA_JOIN_SOURCE,
                           _COMMON_HEADER, template, False, 0, used, {})  # fmt: skip


_GENERATION = 0  # bumped by clear_kernel_caches: a _DecodeMemo from before it is never used


class _SettingsModule(types.ModuleType):
    """This module's class: setting any of its names from outside (``mma_decode.FUSED_JOIN =
    False``, monkeypatch, :func:`tune`'s callers) bumps ``_GENERATION``, so a decode memo's
    key holds that one int instead of every setting the plan read -- built each step of
    every layer, where the host's time sets the decode speed (bench/gpu_notes.md, session
    19)."""

    def __setattr__(self, name: str, value) -> None:
        old = self.__dict__.get(name, _SettingsModule)
        super().__setattr__(name, value)
        if old is not value and name not in ("_GENERATION", "DECODE_MEMO"):  # (read each call)
            super().__setattr__("_GENERATION", self._GENERATION + 1)


sys.modules[__name__].__class__ = _SettingsModule


def clear_kernel_caches() -> None:
    """Forget every built kernel and launch plan (tests and benches that swap
    ``mx.fast.cuda_kernel`` for a stand-in), the workspaces' decode memos too."""
    global _GENERATION
    _GENERATION += 1
    for f in (baked_kernel, _layer_plan, _split_launch):
        f.cache_clear()


TUNABLES = ("STEPS", "SPLIT_FACTOR", "TILES_PER_WARP", "WARPS", "FOLD", "PIPELINE", "LINEAR_GRID",
             "COMPACT_VALUES", "FUSED_JOIN", "FUSED_MAX_WORK", "FUSED_MAX_TAIL", "DECODE_MEMO",
             "SHORT_BODY", "SHORT_ROWS", "JOIN_STAGE", "ROPE_SMEM")  # fmt: skip


def tune(**settings) -> None:
    """Set :data:`TUNABLES` by name (benches' ``--tune WARPS=8``) and forget what was
    planned under the old values."""
    unknown = sorted(set(settings) - set(TUNABLES))
    if unknown:
        raise ValueError(f"not a tunable of mma_decode: {', '.join(unknown)}")
    globals().update(settings)
    clear_kernel_caches()


def steps_for(key_layout: int, dim: int, steps: int | None = None) -> int:
    """Steps of 16 positions per super-tile for a key layout and head dim: ``steps`` (by
    default the module's ``STEPS``) if set, else the rule."""
    steps = STEPS if steps is None else steps
    if steps is not None:
        return steps
    return 8 if key_layout == KEY_LAYOUTS["channel"] and dim <= 128 else 4


def num_splits(
    length: int,
    blocks: int,
    steps: int = 4,
    num_sms: int = NUM_SMS_GUESS,
    factor: int = 2,
    warps: int | None = None,
    fill: bool = False,
    tiles_per_warp: int = 1,
) -> int:
    """Context splits for about ``factor`` blocks per SM (``fill``: at most that, so the
    split blocks run in one wave), each at least one super-tile per warp; with
    ``tiles_per_warp`` > 1, at least 2 a warp up to one block an SM and that many beyond."""
    slots = factor * num_sms / max(1, blocks)
    want = max(1, math.floor(slots) if fill else math.ceil(slots))
    tile = 16 * steps
    per_warp = tile * (warps or WARPS)
    most = math.ceil(length / per_warp)
    if tiles_per_warp > 1:  # 2 a warp up to a block an SM, tiles_per_warp beyond
        one_wave = max(1, num_sms // max(1, blocks))
        two = min(one_wave, math.ceil(length / (2 * per_warp)))
        most = min(most, max(two, math.ceil(length / (tiles_per_warp * per_warp))))
    s = max(1, min(want, most))
    chunk = math.ceil(math.ceil(length / s) / tile) * tile  # what the kernel computes
    return max(1, math.ceil(length / chunk))  # no split left without positions


def pipelined(k_layout, v_layout, dim: int, steps: int) -> bool:
    """Whether the split kernel stages tiles with cp.async (``PIPE``) for these layouts:
    4-bit channel keys in groups of at least a super-tile of 128, 4-bit affine values with
    one group a vector, head dim 64 or 128."""
    return (
        k_layout[:2] == (KEY_LAYOUTS["channel"], 4)
        and k_layout[2] >= 128
        and steps == 8
        and v_layout == (VALUE_LAYOUTS["affine"], 4, dim)
        and dim in (64, 128)
    )


FP_SMEM_MIN = 48 * 1024  # > 48000: MLX then raises the kernel's shared-memory limit


def fp_chunk_smem(dim: int) -> int:
    """Dynamic shared memory of a ``tqm::fp_chunk`` block: a chunk's keys and values as
    floats, the tile's 8 queries, their weights."""
    c = MMA_FP_CHUNK
    return 4 * (c * (dim + 1) + c * dim + 8 * (dim + 1) + 8 * c)


def pipeline_smem(dim: int, warps: int) -> int:
    """Dynamic shared memory of a ``PIPE`` block: per warp a key and a value tile of 4-bit
    codes (64 bytes a row, 128 positions) and the tile's staged scales and biases."""
    return warps * (64 * dim + 64 * dim + 2 * (2 * dim + 2 * 128))


def side_layout(side, values: bool = False) -> tuple[int, int, int] | None:
    """``(layout, bits, group)`` the kernel reads for a packed side, or None if it cannot."""
    # Cached: a decode step asks once per layer, and host time per layer adds up.
    return _side_layout(side.spec, side.dim, values, side.parts[1].shape[-1], STEPS)


@lru_cache(maxsize=256)
def _side_layout(spec, dim: int, values: bool, cols: int, steps: int | None):
    table = VALUE_LAYOUTS if values else KEY_LAYOUTS
    if spec.quantizer not in table or dim not in HEAD_DIMS:
        return None
    allowed = CODEBOOK_BITS if spec.quantizer == "codebook" else AFFINE_BITS
    if spec.bits not in allowed:
        return None
    if spec.quantizer == "codebook":
        return table["codebook"], spec.bits, dim
    if spec.per_channel:
        if spec.group_size < 8 * steps_for(KEY_LAYOUTS["channel"], dim, steps):
            return None  # a half super-tile must sit inside one group of positions
        return table["channel"], spec.bits, spec.group_size
    group = dim // cols
    if group < 32 or (values and group < dim // 8):
        return None
    return table["affine"], spec.bits, group


def supports(queries: mx.array, keys, values) -> bool:
    """Whether the kernels handle this decode call (``queries`` rotated or not: shapes only)."""
    kp, vp = keys.parts, values.parts
    layouts = _layouts(
        queries.shape[2], queries.shape[1], kp[0].shape[1], keys.n_body, keys.spec, values.spec,
        keys.dim, values.dim, kp[1].shape[-1], vp[1].shape[-1], kp[1].dtype, vp[1].dtype, STEPS,
    )  # fmt: skip
    return layouts is not None


def _layouts(q_len, hq, hkv, n_body, k_spec, v_spec, k_dim, v_dim, k_cols, v_cols, k_sdtype,
             v_sdtype, steps):  # fmt: skip
    """``(key layout, value layout)`` the kernels read for a decode call, or None."""
    if q_len != 1 or k_dim != v_dim or n_body == 0 or hq % hkv:
        return None
    if k_sdtype != mx.float16 or v_sdtype != mx.float16:
        return None
    k_layout = _side_layout(k_spec, k_dim, False, k_cols, steps)
    v_layout = _side_layout(v_spec, v_dim, True, v_cols, steps)
    return None if k_layout is None or v_layout is None else (k_layout, v_layout)


def mma_body_attention(
    q_rot: mx.array,
    keys,
    values,
    scale: float,
    *,
    splits: int | None = None,
    poison: bool = False,
) -> tuple[mx.array, mx.array]:
    """Attention of one query per head over the quantized body only.

    ``q_rot``: ``(B, Hq, 1, D)`` rotated (any float dtype), unscaled. Returns float32
    ``(out (B, Hq, 1, D) in the rotated space, lse2 (B, Hq, 1, 1))`` with ``lse2`` the
    base-2 log-sum-exp of ``scale * log2(e) * q.k`` over the body (the key centre, if
    any, is not included). ``poison`` fills the outputs with NaN first (tests).
    """
    o_part, ml_part = _split(q_rot.astype(mx.float32), None, keys, values, scale, splits, poison)
    b, hq, _, d = q_rot.shape
    return _combine_kernel(d)(
        inputs=[o_part, ml_part],
        grid=(b * hq * d, 1, 1),
        threadgroup=(d, 1, 1),
        output_shapes=[(b, hq, 1, d), (b, hq, 1, 1)],
        output_dtypes=[mx.float32, mx.float32],
        init_value=float("nan") if poison else None,
    )


def mma_decode_layer(
    queries: mx.array,
    keys,
    values,
    scale: float,
    sinks: mx.array | None = None,
    *,
    splits: int | None = None,
    poison: bool = False,
) -> mx.array | None:
    """The whole decode attention of a layer: the split kernel over the body, whose last
    blocks take the full-precision sink and tail (if any), then one join (splits, rotation
    back, key centre, the fp partials, learned sinks) -- by the split kernel's last block of
    each row where ``_layer_plan`` fuses it (one launch), else a second launch.

    ``queries``: ``(B, Hq, 1, D)`` model space, rotated inside the split kernel (no MLX
    op per step for it). Returns ``(B, Hq, 1, D)`` in the queries' dtype, or None when the
    kernels cannot read this call (:func:`supports`) or the rotation has no sign vector
    (the caller then takes another path).
    """
    if splits is None and not poison and DECODE_MEMO:
        out = steady_decode_layer(queries, keys, values, scale, sinks)
        if out is not None:
            return out
    work = keys.workspace
    head, append, buffered = keys.head, keys.append, keys.tail_buf
    n_head = 0 if head is None else head.shape[2]
    if buffered is not None:  # the whole tail buffers and the tail's length (TLEN)
        tail, n_tail, v_tail = buffered[0], buffered[1], values.tail_buf[0]
    else:
        tail = keys.tail
        n_tail, v_tail = 0 if tail is None else tail.shape[2], values.tail
    rope = None  # the RoPE the kernel applies to the query and the new key (rope_fusion)
    if type(queries) is PendingRope or (append is not None and type(append.k) is PendingRope):
        rope = _rope_taken(queries, keys, append, n_head + keys.n_body + n_tail - 1)
        if rope is None:  # rotated by MLX ops, as the paths that decline read them too
            queries = as_array(queries)
            if append is not None:
                append.k = as_array(append.k)
        else:
            queries = queries.x
    head_chunks, tail_chunks = -(-n_head // MMA_FP_CHUNK), -(-n_tail // MMA_FP_CHUNK)
    fp_side = head if n_head else tail if n_tail else None
    fp_dtype = None if fp_side is None else fp_side.dtype
    memo_key = None
    if work is not None and not poison and DECODE_MEMO:
        # everything the plan reads but the body views and specs (compared by identity),
        # the module's settings included: tests and benches change them between calls
        # (the settings by _GENERATION: setting one from outside bumps it, _SettingsModule)
        memo_key = (
            queries.shape, queries.dtype, head_chunks, tail_chunks, fp_dtype, scale, splits,
            sinks is None, keys.center is None, keys.dim, values.dim, keys.use_rotation,
            keys.seed, keys.body_len, append is None, buffered is None, rope, _GENERATION,
        )  # fmt: skip
        memo = work.decode_memo
        if (
            memo is not None
            and memo.k_parts is keys.parts
            and memo.v_parts is values.parts
            and memo.k_spec is keys.spec
            and memo.v_spec is values.spec
            and memo.key == memo_key
        ):
            return memo.launch(queries, keys, values, scale, sinks, work)
    rot = keys.rotation
    if rot is not None and rot.signs is None:
        return None
    kp, vp = keys.parts, values.parts

    # Everything but the arrays is planned once per shape (host time per layer decides
    # decode speed when the host, not the GPU, is the bottleneck: bench/gpu_notes.md).
    def plan_for(tail_chunks):
        return _layer_plan(
            keys.spec, values.spec, keys.dim, values.dim, kp[1].shape[-1], vp[1].shape[-1],
            kp[1].dtype, vp[1].dtype, queries.shape, queries.dtype, kp[0].shape[1], keys.n_body,
            rot is not None, head_chunks, tail_chunks, fp_dtype,
            keys.center is not None, sinks is not None, scale, splits,
            *_plan_tunables(), fused=FUSED_JOIN and work is not None, staged=JOIN_STAGE,
            rsmem=ROPE_SMEM,
            fused_max=None if FUSED_MAX_WORK is None else (FUSED_MAX_WORK, FUSED_MAX_TAIL),
            counter_rows=JOIN_COUNTER_ROWS, append=append is not None, tlen=buffered is not None,
            rope=None if rope is None else (rope.dims, rope.traditional),
        )  # fmt: skip

    plan = plan_for(tail_chunks)
    if memo_key is not None:
        work.decode_memo = None  # (made again below)
    if plan is None:
        return None
    split, join, const = plan
    init = float("nan") if poison else None
    cshift = _centre_shift(queries, keys, rot, scale) if keys.center is not None else None
    sinks = sinks.astype(mx.float32) if sinks is not None else None
    # None: an input the planned kernel does not take (nor returns, for outputs)
    fp_inputs = [head, values.head, tail, v_tail] if n_head or n_tail else [None] * 4
    fp_inputs += _append_inputs(append, queries) if append is not None else [None] * 3
    work_array = work.at_least(split.work_floats) if join is None else None
    params = const if buffered is None else tail_params(scale * LOG2E, n_tail)
    inputs = _split_inputs(split, queries, keys, values, params, rot, rope) + fp_inputs
    if memo_key is not None:
        work.decode_memo = _DecodeMemo(memo_key, keys, values, rot, split, inputs, scale, join)
        if splits is None and buffered is not None and append is not None:
            work.decode_memo.steady_on(keys, values, queries, n_head + keys.n_body, rope, scale)
            work.decode_memo.chain(plan_for, work, buffered[0].shape[2])
    o_part, ml_part, fp_o, fp_ml, out = split.launch(inputs + [work_array, cshift, sinks], init)
    if join is not None:  # (else the split kernel joined: FUSED_JOIN)
        signs = rot.signs if rot is not None else None
        (out,) = join.launch([o_part, ml_part, fp_o, fp_ml, signs, cshift, sinks], init)
    if append is not None:
        append.writer = out  # the split launch wrote them; out comes after it
    return out


mma_decode_layer.takes_rope = True  # a PendingRope query and new key (rope_fusion)


def steady_decode_layer(queries, keys, values, scale: float, sinks=None) -> mx.array | None:
    """A steady decode step: the launch :func:`mma_decode_layer` would plan for it, made from
    the layer's memo (:meth:`_DecodeMemo.steady_on`), or None -- every layer runs it every
    step on CUDA, where host time sets the decode speed, so it is one frame (bench/gpu_notes.md,
    session 20). The sides' shared ``fields`` (BufferedTail) stand for every field the plan
    read but the tail's and the new position's; those, the call's arguments and the pending
    RoPE (as :func:`_rope_taken` decides it) are checked here."""
    kd = keys.__dict__
    fields = kd.get("fields")  # (a BufferedTail's: the dict its other fields came from)
    work = None if fields is None else fields["workspace"]
    memo = None if work is None else work.decode_memo
    if (
        memo is None
        or memo.k_fields is not fields
        or values.__dict__.get("fields") is not memo.v_fields
        or memo.gen != _GENERATION
        or not DECODE_MEMO
        or scale != memo.scale
        or (sinks is not None) != memo.has_sinks
    ):
        return None
    append = kd["append"]
    buf, n = kd["tail_buf"]
    if append is None or buf.dtype != memo.fp_dtype:
        return None
    chunks = -(-n // MMA_FP_CHUNK)
    # The tail's next chunk: the plan the memo made for it (right whatever this step then
    # decides: the memo is that chunk count's from here on).
    if chunks != memo.chunks:
        planned = memo.by_chunks.get(chunks)
        if planned is None:
            return None
        memo.split, memo.join, memo.key = planned
        memo.chunks = chunks
    q, k, rope = queries, append.k, memo.rope
    if rope is None:  # (the memo's launch rotated them by MLX ops: so must this step)
        if type(q) is PendingRope or type(k) is PendingRope:
            return None
    elif (  # _rope_taken's rule at the context's last position, the spec the memo's
        type(q) is not PendingRope
        or type(k) is not PendingRope
        or q.spec is not rope
        or k.rope is not q.rope
        or not q.offset == k.offset == memo.fixed + n - 1
        or k.shape[2] != 1
    ):
        return None
    else:
        q, k = q.x, k.x
    if queries.shape != memo.q_shape or queries.dtype != memo.q_dtype:
        return None
    # The split launch's inputs in SPLIT_INPUTS' order (:meth:`_DecodeMemo.launch`, written
    # out for a tail buffer and new positions: steady_on holds them).
    inputs = [q, *memo.static]
    table = memo.params
    inputs[memo.params_at] = table[n] if n < len(table) else tail_params(memo.scale2, n)
    vd = values.__dict__
    if memo.kh:
        inputs += (kd["head"], vd["head"])
    after = append.after
    inputs += (buf, vd["tail_buf"][0], k, append.v, q if after is None else after)
    if memo.work:
        inputs.append(work.array)
    if memo.cshift:
        inputs.append(_centre_shift(q, keys, memo.rot, scale))
    if memo.sinks:
        inputs.append(sinks.astype(mx.float32))
    split = memo.split
    made = split.kernel(inputs=inputs, grid=split.grid, threadgroup=split.threadgroup,
                        output_shapes=split.shapes, output_dtypes=split.dtypes,
                        init_value=None)  # fmt: skip
    out = made[0] if memo.join is None else memo.joined(made, q, keys, scale, sinks)
    append.writer = out
    return out


mma_decode_layer.steady = steady_decode_layer  # attention.turboquant_attention asks it first


def _append_inputs(append, queries) -> list:
    """kn, vn, after: the step's new positions (unrotated where the kernel applies their
    RoPE) and the launch to follow (the layer's last writer, else any evaluated-or-not array
    of this step: the queries)."""
    k = append.k.x if type(append.k) is PendingRope else append.k
    return [k, append.v, queries if append.after is None else append.after]


def _rope_taken(queries, keys, append, last: int) -> RopeSpec | None:
    """The RoPE the split kernel can apply itself (template RDIMS): one query and one new
    key, both pending from the same rope at the same position -- the context's ``last`` --
    and no key centre (whose shift MLX works out from the rotated query)."""
    k = None if append is None else append.k
    if type(queries) is not PendingRope or type(k) is not PendingRope:
        return None
    spec = queries.spec
    ok = (
        k.rope is queries.rope
        and queries.offset == k.offset == last
        and queries.shape[2] == 1
        and k.shape[2] == 1
        and keys.center is None
        and spec.dims <= queries.shape[3]
    )
    return spec if ok else None


def rope_table(spec: RopeSpec) -> mx.array:
    """The kernel's ``rope`` input: the pairs' frequencies, float32 in device memory. Kept
    on the spec object (hashing its frequencies every call would cost more than the lookup
    saves), one for all equal specs (every layer of a model: one device array, one sync)."""
    table = spec.__dict__.get("_table")
    if table is None:
        table = spec.__dict__["_table"] = _rope_table(spec)
    return table


@lru_cache(maxsize=64)
def _rope_table(spec: RopeSpec) -> mx.array:
    inv = list(spec.inv_freq) + [0.0] * max(0, 4 - len(spec.inv_freq))  # (> 8 bytes)
    return device_constant(mx.array(inv, dtype=mx.float32))


def _centre_shift(queries, keys, rot, scale) -> mx.array:
    """q.centre per head, ``(B, Hq)``: the body's scores leave it out, the join adds it."""
    b, hq = queries.shape[:2]
    return centre_shift2(rotate(queries, rot), keys, scale).reshape(b, hq)


_STATIC = range(1, SPLIT_INPUTS.index("kh"))  # kw .. rope: the same while the body views are
_PARAMS = SPLIT_INPUTS.index("params")  # (but for TLEN's tail length, set each call)
_DYNAMIC = ("kh", "kt", "kn", "work", "cshift", "sinks")  # per call (kh/vh, kt/vt, kn/vn/after)


class _DecodeMemo:
    """A layer's split launch with its static inputs (and its join launch where the plan is
    not fused), for the next calls that read the same body views and specs (held here, so no
    id is reused) and the same ``key``."""

    __slots__ = ("key", "k_parts", "v_parts", "k_spec", "v_spec", "rot", "split", "static",
                 "kh", "kt", "kn", "work", "cshift", "sinks", "tlen", "params_at", "scale2", "params",
                 "k_fields", "v_fields", "gen", "q_shape", "q_dtype", "chunks", "fp_dtype",
                 "scale", "has_sinks", "rope", "fixed", "by_chunks", "join", "join_flags")  # fmt: skip

    def __init__(self, key, keys, values, rot, split, inputs, scale, join=None):
        self.key, self.rot = key, rot
        self.k_parts, self.v_parts, self.k_spec, self.v_spec = (
            keys.parts, values.parts, keys.spec, values.spec
        )  # fmt: skip
        # a fused plan's one output, else the partials the join takes
        assert (split.kept_out == (SPLIT_OUTPUTS.index("out"),)) == (join is None)
        layout = split.__dict__.get("memo_layout")
        if layout is None:  # (once a plan: a memo is made again every tail chunk of a layer)
            kept = [SPLIT_INPUTS[i] for i in split.kept]
            static = [i for i in split.kept if i in _STATIC]
            flags = tuple(name in kept for name in _DYNAMIC)
            layout = split.memo_layout = (_picker(static), static.index(_PARAMS) + 1, flags)
        pick, self.params_at, flags = layout  # (params: after the queries)
        self.static = pick(inputs)
        self.kh, self.kt, self.kn, self.work, self.cshift, self.sinks = flags
        self.split, self.join = split, join
        # the join's per-call inputs: (the rotation's signs, q.centre, the learned sinks)
        self.join_flags = None if join is None else _join_flags(join, rot)
        # TLEN: the tail's length is in params, one cached constant a length (tail_params)
        self.tlen = keys.tail_buf is not None
        self.scale2 = scale * LOG2E
        self.params = _tail_params(self.scale2) if self.tlen else ()  # (tail_params' table)
        self.k_fields = None  # (steady_on: none yet)
        self.by_chunks = {}  # (chain: none yet)

    def steady_on(self, keys, values, queries, fixed: int, rope, scale: float) -> None:
        """Let :func:`steady_decode_layer` take the next decode steps of these sides' cache:
        ``fixed``, the sink's and body's positions; ``rope``: the RoPE the kernel applied or
        None. (A plan with a tail buffer and new positions: their inputs are kept.)"""
        assert self.tlen and self.kt and self.kn
        self.k_fields = keys.__dict__.get("fields")
        self.v_fields = values.__dict__.get("fields")
        self.gen, self.fixed, self.rope, self.scale = _GENERATION, fixed, rope, scale
        self.q_shape = queries.shape
        self.q_dtype = queries.dtype
        buf, n = keys.tail_buf
        self.chunks, self.fp_dtype = -(-n // MMA_FP_CHUNK), buf.dtype
        self.has_sinks = self.sinks if self.join is None else self.join_flags[2]

    def chain(self, plan_for, work, capacity: int) -> None:
        """The plans of the tail's next chunk counts, up to a tail buffer of ``capacity``
        positions, for :func:`steady_decode_layer` to switch to as the tail grows: a chunk
        step (every 16 decode steps) then makes no memo (~1,700 opcodes a layer, against
        ~740 a steady step; bench/gpu_notes.md, session 21). Only plans that read the inputs
        this one reads, fused if it is; the workspace grows once to the largest."""
        by, most = {}, 0
        for c in range(self.chunks + 1, -(-capacity // MMA_FP_CHUNK) + 1):
            plan = plan_for(c)
            if (
                plan is None
                or plan[0].kept != self.split.kept
                or (plan[1] is None) != (self.join is None)
                or (plan[1] is not None and plan[1].kept != self.join.kept)
            ):
                break
            # (memo_key's fourth field is the tail's chunk count)
            by[c] = (plan[0], plan[1], self.key[:3] + (c,) + self.key[4:])
            if plan[1] is None:
                most = max(most, plan[0].work_floats)
        if most:
            work.at_least(most)
        self.by_chunks = by

    def __deepcopy__(self, _memo):
        return None  # a copied cache plans afresh (a kernel object does not copy)

    def launch(self, queries, keys, values, scale, sinks, work) -> mx.array:
        """The split launch for this call, its inputs in the order of ``SPLIT_INPUTS`` as
        :func:`mma_decode_layer` passes them."""
        inputs = [queries, *self.static]
        if self.tlen:
            inputs[self.params_at] = tail_params(self.scale2, keys.tail_buf[1])
        if self.kh:
            inputs += (keys.head, values.head)
        if self.kt:
            inputs += (
                (keys.tail_buf[0], values.tail_buf[0]) if self.tlen else (keys.tail, values.tail)
            )
        if self.kn:
            inputs += _append_inputs(keys.append, queries)
        if self.work:  # at_least(the plan's floats) was asked when it was made
            inputs.append(work.array)
        if self.cshift:
            inputs.append(_centre_shift(queries, keys, self.rot, scale))
        if self.sinks:
            inputs.append(sinks.astype(mx.float32))
        made = self.split.call(inputs, None)
        out = made[0] if self.join is None else self.joined(made, queries, keys, scale, sinks)
        if self.kn:
            keys.append.writer = out
        return out

    def joined(self, made, queries, keys, scale, sinks) -> mx.array:
        """The join launch after a split launch that wrote ``made`` (its kept outputs)."""
        # (_Launch.launch's spreading of the written outputs, inlined: a shared helper cost
        # this steady path ~20-65 opcodes a layer, measured; len 4: every partial written)
        if len(made) == 4:  # o_part, ml_part, fp_o, fp_ml
            parts = [*made]
        else:
            parts = [None] * 4
            for i, a in zip(self.split.kept_out, made, strict=True):
                parts[i] = a
        signs, centre, has_sinks = self.join_flags
        parts += (
            signs,
            _centre_shift(queries, keys, self.rot, scale) if centre else None,
            sinks.astype(mx.float32) if has_sinks else None,
        )
        return self.join.launch(parts, None)[0]


def _join_flags(join, rot) -> tuple:
    """(signs or None, whether the join takes q.centre, whether it takes learned sinks)."""
    kept = [JOIN_INPUTS[i] for i in join.kept]
    signs = rot.signs if "signs" in kept and rot is not None else None
    return signs, "cshift" in kept, "sinks" in kept


def _picker(indices):
    """``f(items) -> [items[i] for i in indices]``, by ``operator.itemgetter`` (no Python loop)."""
    if len(indices) == 1:
        return lambda items, _i=indices[0]: [items[_i]]
    get = itemgetter(*indices)
    return lambda items: list(get(items))


class _Launch:
    """One planned launch: the kernel (its template written in) and everything but its input
    arrays. :meth:`launch` takes every input of the kernel's full list (None or anything
    where the plan reads none) and returns every output, None where the plan writes none."""

    def __init__(self, planned, grid, threadgroup, shapes, dtypes, **extra):
        self.kernel, self.kept, kept_out = planned
        self.grid, self.threadgroup = grid, threadgroup
        self.shapes = [shapes[i] for i in kept_out]
        self.dtypes = [dtypes[i] for i in kept_out]
        self.n_out, self.kept_out = len(shapes), kept_out
        self.__dict__.update(extra)

    def call(self, kept_inputs, init_value) -> list:
        """The kernel on the inputs it takes, in its order; the outputs it writes."""
        return self.kernel(
            inputs=kept_inputs,
            grid=self.grid,
            threadgroup=self.threadgroup,
            output_shapes=self.shapes,
            output_dtypes=self.dtypes,
            init_value=init_value,
        )

    def launch(self, inputs, init_value):
        pick = self.__dict__.get("pick")
        if pick is None:
            pick = self.pick = _picker(self.kept)
        made = self.call(pick(inputs), init_value)
        if len(made) == self.n_out:
            return made
        out = [None] * self.n_out
        for i, a in zip(self.kept_out, made, strict=True):
            out[i] = a
        return out


@lru_cache(maxsize=1024)
def _layer_plan(k_spec, v_spec, k_dim, v_dim, k_cols, v_cols, k_sdtype, v_sdtype, q_shape,
                q_dtype, hkv, n_body, has_rot, head_chunks, tail_chunks, fp_dtype, has_center,
                has_sinks, scale, splits, *tunables, fused=False, fused_max=None,
                counter_rows=JOIN_COUNTER_ROWS, append=False, tlen=False, rope=None,
                staged=False, rsmem=False):  # fmt: skip
    """The two launches of a decode layer (``fused``: the split kernel alone, joining in its
    last blocks, where its rows fit the ``counter_rows`` counters and its work and tail
    ``fused_max``), or None where the kernels cannot read it (:func:`_layouts`, as for
    :func:`supports`). Cached: the same for every step of a body block and a chunk of the
    tail."""
    b, hq, length, d = q_shape
    layouts = _layouts(length, hq, hkv, n_body, k_spec, v_spec, k_dim, v_dim, k_cols, v_cols,
                       k_sdtype, v_sdtype, tunables[0])  # fmt: skip
    if layouts is None:
        return None
    fp = (head_chunks, tail_chunks, fp_dtype, append, tlen and tail_chunks > 0,
          rope if append and tail_chunks > 0 else None)  # fmt: skip
    if fused and fused_max is not None:
        _, s = _row_splits(*layouts, b, hq, hkv, d, n_body, splits, tunables)
        work, tail = b * hkv * n_body * d, s * min(8, hq // hkv) * d
        fused = work <= fused_max[0] and tail <= fused_max[1]
    fused = fused and b * hkv * -(-(hq // hkv) // 8) <= counter_rows
    # With a partial RoPE in the kernel (D 128 rotating 64 dims in pairs) the staged join's
    # build needs 180 registers, 2 blocks an SM (NVRTC): such layers join through registers.
    staged = staged and not (fp[5] and fp[5][0] < d)
    join = (fused, has_center, has_sinks, staged) if fused else NO_JOIN
    split = _split_launch(
        *layouts, b, hq, hkv, d, n_body, q_dtype, has_rot, splits, fp, *tunables, join=join,
        rsmem=rsmem,
    )  # fmt: skip
    if fused:
        return split, None, const_input(scale * LOG2E)
    join_template = (("D", d), ("OT", q_dtype), ("HAS_FP", head_chunks + tail_chunks > 0),
                     ("HAS_ROT", has_rot), ("HAS_CENTER", has_center),
                     ("HAS_SINKS", has_sinks))  # fmt: skip
    join = _Launch(
        _join_kernel(join_template), (b * hq * d, 1, 1), (d, 1, 1), [(b, hq, 1, d)], [q_dtype]
    )
    return split, join, const_input(scale * LOG2E)


# (sink chunks, tail chunks, their dtype, new positions, the tail's length in params, the
# RoPE of the query and new positions -- (dims, traditional) or None): none
NO_FP = (0, 0, None, False, False, None)
# (fused join, key centre, learned sinks, its partials staged): a join launch follows
NO_JOIN = (False, False, False, False)


def _split(q, rot, keys, values, scale, splits, poison):
    """The split kernel over the body alone: unnormalised partials
    ``(o_part (B,Hq,S,D), ml_part (B,Hq,S,2))``.

    ``q`` is rotated by the kernel when ``rot`` is given (a Hadamard rotation), else read
    as it is (already rotated, or a cache without rotation).
    """
    b, hq, _, d = q.shape
    launch = _split_launch(
        side_layout(keys), side_layout(values, values=True), b, hq, keys.parts[0].shape[1], d,
        keys.n_body, q.dtype, rot is not None, splits, NO_FP, *_plan_tunables(),
    )  # fmt: skip
    inputs = _split_inputs(launch, q, keys, values, const_input(scale * LOG2E), rot, None)
    inputs += [None] * 10  # no full-precision segments, no join here
    return launch.launch(inputs, float("nan") if poison else None)[:2]


def _split_inputs(launch, q, keys, values, const, rot, rope) -> list:
    """The split kernel's inputs up to the full-precision segments, in the order of
    ``SPLIT_INPUTS`` (the kernel drops what its plan does not read: a codebook side's
    biases, an affine side's table, the signs without a rotation, the RoPE table without
    ``rope``)."""
    kp, vp = keys.parts, values.parts
    signs = rot.signs if rot is not None else None
    kb, vb = (kp[2] if len(kp) > 2 else None), (vp[2] if len(vp) > 2 else None)
    table = None if rope is None else rope_table(rope)
    return [q, kp[0], kp[1], kb, vp[0], vp[1], vb, launch.lut_k, launch.lut_v, const,
            signs, table]  # fmt: skip


@lru_cache(maxsize=1024)
def _split_launch(k_layout, v_layout, b, hq, hkv, d, n_body, q_dtype, rotate_q, splits, fp,
                  *tunables, join=NO_JOIN, rsmem=False):  # fmt: skip
    """The planned split launch (:func:`_split_plan`) with what its inputs need."""
    template, grid, threadgroup, out_shapes, smem = _split_plan(
        k_layout, v_layout, b, hq, hkv, d, n_body, q_dtype, rotate_q, splits, fp, *tunables,
        join=join, rsmem=rsmem,
    )  # fmt: skip
    fp_dtype = str(fp[2] or mx.float16).rsplit(".", 1)[-1]
    return _Launch(
        _split_kernel(tuple(template), smem, fp_dtype), grid, threadgroup, out_shapes,
        [mx.float32] * 4 + [q_dtype],
        lut_k=_lut(k_layout[1], d) if k_layout[0] == 1 else None,
        lut_v=_lut(v_layout[1], d) if v_layout[0] == 1 else None,
        work_floats=work_floats(b * hq, out_shapes[0][2], fp[0] + fp[1], d),
    )  # fmt: skip


def _plan_tunables() -> tuple:
    """The settings a split launch's plan reads, in the order the planners unpack them (they
    are part of the planners' cache keys)."""
    return (STEPS, SPLIT_FACTOR, WARPS, FOLD, PIPELINE, LINEAR_GRID, TILES_PER_WARP,
            COMPACT_VALUES, SHORT_BODY, SHORT_ROWS)  # fmt: skip


def work_floats(heads: int, splits: int, chunks: int, d: int) -> int:
    """Floats the fused join's partials take in a workspace after its counters, as the split
    kernel lays them out for ``heads`` (batch x query heads): o_part, ml_part, fp_o, fp_ml,
    each rounded up to whole lines of ``MMA_WORK_ALIGN`` floats (``tqm::work_span``)."""
    a = MMA_WORK_ALIGN
    return sum(
        -(-heads * n * w // a) * a for n, w in ((splits, d), (splits, 2), (chunks, d), (chunks, 2))
    )


def _steps_pipe(k_layout, v_layout, d, tunables) -> tuple[int, bool]:
    """A split launch's steps a super-tile and whether it stages its tiles (template PIPE)."""
    steps = steps_for(k_layout[0], d, tunables[0])
    return steps, bool(tunables[4]) and pipelined(k_layout, v_layout, d, steps)


def _row_splits(k_layout, v_layout, b, hq, hkv, d, n_body, splits, tunables) -> tuple[int, int]:
    """The split launch's rows (batch x KV heads x tiles of 8 query heads) and splits."""
    _, factor, warps, _, _, linear, tiles_per_warp, _, short_body, short_rows = tunables
    rows = b * hkv * -(-(hq // hkv) // 8)
    if splits:
        return rows, splits
    steps, pipe = _steps_pipe(k_layout, v_layout, d, tunables)
    if pipe and n_body <= short_body and rows <= short_rows:
        s = num_splits(n_body, rows, steps, factor=3, warps=warps, fill=linear)
        if s * min(8, hq // hkv) * d <= _SHORT_MAX_TAIL:
            return rows, s
    return rows, num_splits(n_body, rows, steps, factor=factor, warps=warps, fill=linear,
                            tiles_per_warp=tiles_per_warp if pipe else 1)  # fmt: skip


def _split_plan(k_layout, v_layout, b, hq, hkv, d, n_body, q_dtype, rotate_q, splits, fp,
                *tunables, join=NO_JOIN, rsmem=False):  # fmt: skip
    """Template, grid, output shapes and dynamic shared memory of one split launch (cached
    in :func:`_split_launch`: the same every decode step of a block; ``fp``: the
    full-precision sink's and tail's chunks of 16 positions and their dtype, one block each
    after the splits; ``tunables`` -- STEPS, SPLIT_FACTOR, WARPS, FOLD, PIPELINE,
    LINEAR_GRID, TILES_PER_WARP, COMPACT_VALUES, SHORT_BODY, SHORT_ROWS -- are in the key; ``join``:
    :data:`NO_JOIN` or the fused join's flags; ``rsmem``: :data:`ROPE_SMEM`)."""
    _, _, warps, fold, _, linear, _, compact, _, _ = tunables
    n_ht = -(-(hq // hkv) // 8)
    steps, pipe = _steps_pipe(k_layout, v_layout, d, tunables)
    rows, s = _row_splits(k_layout, v_layout, b, hq, hkv, d, n_body, splits, tunables)
    chunks = fp[0] + fp[1]
    template = [
        ("KQ", k_layout[0]),
        ("VQ", v_layout[0]),
        ("KB", k_layout[1]),
        ("VB", v_layout[1]),
        ("KGS", k_layout[2]),
        ("VGS", v_layout[2]),
        ("D", d),
        ("WARPS", warps),
        ("STEPS", steps),
        ("QROT", rotate_q),
        ("FOLD", fold),
        ("PIPE", pipe),
        ("CVAL", pipe and compact),
        ("RDIMS", fp[5][0] if fp[5] else 0),
        ("RTRAD", bool(fp[5] and fp[5][1])),
        ("QT", q_dtype),
        ("ST", mx.float16),
        ("HAS_HEAD", fp[0] > 0),
        ("HAS_TAIL", fp[1] > 0),
        ("APPEND", fp[3]),
        ("TLEN", fp[4]),
        ("LIN", linear),
        ("FUSED", join[0]),
        ("OT", q_dtype),
        ("HAS_CENTER", join[1]),
        ("HAS_SINKS", join[2]),
    ]
    if join[0] and join[3] and pipe:  # (only then: the product builds' source is as before)
        template.append(("JSTG", True))
    if rsmem and pipe and fp[5]:  # (likewise: only builds with the query's RoPE)
        template.append(("RSMEM", True))
    blocks = s + chunks  # a row's
    grid = (blocks * rows * 32 * warps, 1, 1) if linear else (blocks * 32 * warps, hkv * n_ht, b)
    # fp_chunk blocks stage in the dynamic shared memory (the PIPE rings are larger). MLX
    # lifts a kernel's 48 KB limit on static + dynamic shared memory only for requests over
    # 48000 bytes: at head dim 256 the pool (32 KB) and the chunk (41 KB) need it, so a
    # launch with chunks asks for at least 48 KB (2 blocks an SM still fit; registers allow
    # no more for these layouts).
    smem = pipeline_smem(d, warps) if pipe else 0
    if chunks:
        smem = max(smem, fp_chunk_smem(d), FP_SMEM_MIN)
    fp_shapes = [(b, hq, max(1, chunks), d), (b, hq, max(1, chunks), 2)]  # unused when none
    out_shapes = [(b, hq, s, d), (b, hq, s, 2)] + fp_shapes + [(b, hq, 1, d)]  # out: FUSED
    return template, grid, (32 * warps, 1, 1), out_shapes, smem


@lru_cache(maxsize=16)
def _lut(bits: int, dim: int) -> mx.array:
    from services.turboquant.codebook import centroids

    return device_constant(centroids(bits, dim).astype(mx.float32))
