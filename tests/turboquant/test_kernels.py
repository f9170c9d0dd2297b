"""Fused decode kernel: float64 reference and packing everywhere, the CUDA kernel on CUDA.

The CUDA tests are skipped where MLX has no CUDA device; on the GPU machine they check
the kernel against the float64 reference on fresh random inputs for every supported head
dim, GQA ratio and bit width, odd lengths and outputs poisoned with NaN.
"""

from __future__ import annotations

import dataclasses
import math
import re

import mlx.core as mx
import numpy as np
import pytest

from services.turboquant.kernels import cuda_available, fused_decode, mma_decode, reference
from services.turboquant.kernels.cases import make_case, pack_codes
from services.turboquant.kernels.dispatch import install

TOL = 2e-5  # the kernel computes in float32 on exactly the stored values


@pytest.fixture
def rng() -> np.random.Generator:
    # Fresh inputs every run: the kernel must compute the function, not match a snapshot.
    return np.random.default_rng()


# ----------------------------------------------------------------- reference (everywhere)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_codes_matches_mlx_dequantize(rng, bits):
    x = mx.array(rng.standard_normal((3, 5, 128)).astype(np.float32))
    w, s, b = mx.quantize(x, group_size=32, bits=bits)
    ones, zeros = mx.ones_like(s), mx.zeros_like(b)
    codes_mlx = np.array(mx.dequantize(w, ones, zeros, group_size=32, bits=bits))
    codes = reference.unpack_codes(np.array(w), bits, 128)
    np.testing.assert_array_equal(codes, codes_mlx.astype(np.int64))
    assert codes.max() > (1 << bits) // 2  # not a degenerate all-small draw


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_codes_is_the_mlx_layout(rng, bits):
    x = mx.array(rng.standard_normal((4, 7, 64)).astype(np.float32))
    w, _, _ = mx.quantize(x, group_size=64, bits=bits)
    words = np.array(w)
    np.testing.assert_array_equal(pack_codes(reference.unpack_codes(words, bits, 64), bits), words)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequant_affine_matches_mlx(rng, bits):
    x = mx.array(rng.standard_normal((2, 3, 9, 128)).astype(np.float16))
    w, s, b = mx.quantize(x, group_size=64, bits=bits)
    ref = reference.dequant_affine(
        np.array(w), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32)), bits, 128
    )
    got = np.array(mx.dequantize(w, s, b, group_size=64, bits=bits).astype(mx.float32))
    # MLX dequantizes in float16: compare at that precision.
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (6, 1)])
def test_reference_attention_matches_sdpa(rng, hq, hkv):
    q = rng.standard_normal((2, hq, 1, 64))
    k = rng.standard_normal((2, hkv, 33, 64)) * 2
    v = rng.standard_normal((2, hkv, 33, 64))
    scale = 1 / 8
    ref = reference.decode_attention(q, k, v, scale)
    f32 = [mx.array(a.astype(np.float32)) for a in (q, k, v)]
    got = np.array(mx.fast.scaled_dot_product_attention(*f32, scale=scale))
    assert reference.rel_error(got, ref) < 1e-5


def test_reference_sinks_are_an_extra_softmax_column(rng):
    q = rng.standard_normal((1, 4, 1, 32))
    k = rng.standard_normal((1, 2, 10, 32))
    v = rng.standard_normal((1, 2, 10, 32))
    sinks = rng.standard_normal(4) * 3
    out = reference.decode_attention(q, k, v, 0.3, sinks)
    for h in range(4):
        s = q[0, h, 0] @ k[0, h // 2].T * 0.3
        logits = np.concatenate([[sinks[h]], s])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        np.testing.assert_allclose(out[0, h, 0], p[1:] @ v[0, h // 2], rtol=1e-10)


def test_rel_error_flags_nan():
    assert math.isnan(reference.rel_error(np.array([1.0, np.nan]), np.array([1.0, 2.0])))


# ----------------------------------------------------------------- launch shape (everywhere)
@pytest.mark.parametrize("tile", [64, 128])
def test_splits_cover_the_context_without_empty_splits(rng, tile):
    for length in [1, 63, 64, 65, *rng.integers(2, 300_000, size=50).tolist()]:
        for bps in [1, 2, 8, 16, 600]:
            s = fused_decode.num_splits(length, bps, tile=tile)
            # The kernel's own chunk formula.
            chunk = math.ceil(math.ceil(length / s) / tile) * tile
            assert s >= 1 and chunk % tile == 0
            assert (s - 1) * chunk < length <= s * chunk, (length, bps, s, chunk)


def test_kernel_constants_are_cached_device_arrays_not_scalars():
    # MLX keeps arrays of <= 8 bytes in unified memory that kernels read across the bus
    # (session 6 on the H200: the fp kernel 20 -> 4 us, the split kernel at 4K 21 -> 13 us),
    # so a constant must be bigger than that, made by a GPU op, and made once.
    c = fused_decode.const_input(0.125)
    assert c is fused_decode.const_input(0.125)
    assert c.nbytes > 8 and c.dtype == mx.float32
    assert c[0].item() == 0.125
    assert fused_decode.const_input(0.5)[0].item() == 0.5


def test_heads_per_block_divides_the_group():
    for group in range(1, 33):
        hb = fused_decode.heads_per_block(group)
        assert group % hb == 0 and 1 <= hb <= fused_decode.MAX_HEADS_PER_BLOCK


def _packed(config, dim=128, length=300, hq=8, hkv=2):
    from services.turboquant import TurboQuantConfig
    from services.turboquant.kernels.cases import cache_case

    case = cache_case(
        np.random.default_rng(0), TurboQuantConfig(**config), batch=1, q_heads=hq,
        kv_heads=hkv, dim=dim, length=length,
    )  # fmt: skip
    return mx.zeros((1, hq, 1, dim)), case.keys, case.values


@pytest.mark.parametrize(
    "config,dim,layout",
    [
        (dict(key_quantizer="channel", group_size=128, sink_tokens=1), 128, (2, 4, 128)),
        (dict(), 128, (0, 4, 64)),
        (dict(quantizer="codebook", key_bits=3), 64, (1, 3, 64)),
        (dict(key_bits=8, value_bits=2, group_size=32), 256, (0, 8, 32)),
    ],
)
def test_v4_reads_the_cache_layouts(recorded_kernels, config, dim, layout):
    q, keys, values = _packed(config, dim)
    assert mma_decode.side_layout(keys) == layout
    assert mma_decode.supports(q, keys, values)
    # The layer plans its launches itself (dispatch no longer asks supports() first).
    assert mma_decode.mma_decode_layer(q, keys, values, 0.1) is not None


def test_v4_declines_what_it_cannot_read(recorded_kernels):
    def declined(q, keys, values):
        layer = mma_decode.mma_decode_layer(q, keys, values, 0.1)
        assert (layer is None) == (not mma_decode.supports(q, keys, values))
        return layer is None

    q, keys, values = _packed(dict(key_quantizer="channel", group_size=32))
    assert mma_decode.side_layout(keys) is None  # 8-step tiles at D 128 need groups >= 64
    assert declined(q, keys, values)
    q, keys, values = _packed(dict(key_bits=5, value_bits=6))  # 5/6-bit: portable only
    assert declined(q, keys, values)
    q, keys, values = _packed(dict(sink_tokens=4), length=3)  # nothing quantized yet
    assert keys.n_body == 0 and declined(q, keys, values)
    q, keys, values = _packed(dict(group_size=32), dim=96)  # not a power-of-two head dim
    assert declined(q, keys, values)
    q, keys, values = _packed(dict())
    assert declined(mx.zeros((1, 8, 3, 128)), keys, values)  # prefill
    assert declined(mx.zeros((1, 7, 1, 128)), keys, values)  # 7 query heads on 2 kv heads
    assert not recorded_kernels  # nothing launched for a declined call


def test_codebook_tables_are_cached_device_arrays():
    # Like the constants: one array made by a GPU op, not a host-made one every launch.
    from services.turboquant.codebook import centroids

    lut = mma_decode._lut(3, 128)
    assert lut is mma_decode._lut(3, 128) and lut.dtype == mx.float32
    np.testing.assert_array_equal(np.array(lut), np.array(centroids(3, 128)))


def test_the_cached_layout_follows_the_super_tile_setting(monkeypatch):
    q, keys, values = _packed(dict(key_quantizer="channel", group_size=32))
    assert mma_decode.side_layout(keys) is None  # 8-step tiles (the rule at D 128)
    monkeypatch.setattr(mma_decode, "STEPS", 4)  # half super-tiles of 32 fit a group of 32
    assert mma_decode.side_layout(keys) == (2, 4, 32)


# the planners' last tunables as the module sets them: TILES_PER_WARP, COMPACT_VALUES,
# SHORT_BODY, SHORT_ROWS
SHORT = (mma_decode.SHORT_BODY, mma_decode.SHORT_ROWS)
REST = (4, True, *SHORT)


def test_split_launches_are_planned_from_their_settings():
    layouts = ((2, 4, 128), (0, 4, 128))
    args = (*layouts, 1, 32, 8, 128, 131072, mx.float16, True, None, mma_decode.NO_FP)
    # tunables: STEPS, SPLIT_FACTOR, WARPS, FOLD, PIPELINE, LINEAR_GRID (the rows grid here),
    # TILES_PER_WARP, COMPACT_VALUES
    template, grid, _, shapes, smem = mma_decode._split_plan(
        *args, None, 2, 4, True, True, False, *REST
    )
    t = dict(template)
    assert (t["STEPS"], t["FOLD"], t["QROT"], t["WARPS"], t["PIPE"]) == (8, True, True, 4, True)
    assert not t["LIN"] and grid[1:] == (8, 1) and shapes[0][2] == grid[0] // 128
    # the staged tiles: a key and a value tile of 64 bytes a row and their scales per warp
    assert smem == mma_decode.pipeline_smem(128, 4) == 4 * (2 * 128 * 64 + 2 * (2 * 128 + 256))
    assert 3 * (smem + 8 * 1024) <= 228 * 1024  # with the static part: 3 blocks an SM fit
    template4, grid4, _, _, smem4 = mma_decode._split_plan(
        *args, 4, 3, 4, False, True, False, *REST
    )
    assert dict(template4)["STEPS"] == 4 and not dict(template4)["FOLD"]
    assert not dict(template4)["PIPE"] and smem4 == 0  # 4-step tiles: loads into registers
    assert grid4[0] > grid[0]  # more splits for 3 blocks an SM than for 2
    off = mma_decode._split_plan(*args, None, 2, 4, True, False, False, *REST)
    assert not dict(off[0])["PIPE"] and off[4] == 0
    # the full-precision sink and tail: one block each 16 positions after the splits; they
    # stage in the dynamic shared memory (the PIPE rings when there are some, else their own)
    fp_args = (*args[:-1], (1, 4, mx.bfloat16, False, False, None))
    t_fp, grid_fp, _, shapes_fp, smem_fp = mma_decode._split_plan(
        *fp_args, None, 2, 4, True, True, False, *REST
    )
    t_fp = dict(t_fp)
    assert (t_fp["HAS_HEAD"], t_fp["HAS_TAIL"]) == (True, True)
    assert grid_fp[0] == grid[0] + 5 * 128 and shapes_fp[:2] == shapes[:2]
    assert shapes_fp[2:4] == [(1, 32, 5, 128), (1, 32, 5, 2)] and smem_fp == smem
    off_fp = mma_decode._split_plan(*fp_args, None, 2, 4, True, False, False, *REST)
    assert mma_decode.fp_chunk_smem(128) == 4 * (24 * 129 + 16 * 128 + 8 * 16)
    # over MLX's 48000-byte threshold: the kernel's limit is raised (static + dynamic > 48 KB)
    assert off_fp[4] == max(mma_decode.fp_chunk_smem(128), 48 * 1024) > 48000
    assert not dict(template)["HAS_HEAD"] and not dict(template)["HAS_TAIL"]
    assert not t_fp["APPEND"] and not dict(template)["APPEND"]


def test_the_linear_grid_fills_one_wave_with_split_blocks_then_the_chunks():
    # 1-D grid: (splits + chunks) x rows blocks, rows = batch x KV heads x head tiles; the
    # split count is at most SPLIT_FACTOR blocks an SM (one wave), not rounded up past it
    # (TILES_PER_WARP 1 below: the fill rule alone)
    for b, hq, hkv, factor in [(1, 32, 8, 2), (2, 64, 4, 3), (1, 12, 1, 2)]:
        rows = b * hkv * -(-(hq // hkv) // 8)
        args = ((2, 4, 128), (0, 4, 128), b, hq, hkv, 128, 131072, mx.float16, True, None)
        # (a step's new positions written, their RoPE by the kernel: the same grid)
        fp = (1, 4, mx.float16, True, False, (128, False))
        template, grid, group, shapes, _ = mma_decode._split_plan(
            *args, fp, None, factor, 4, True, True, True, 1, True, *SHORT
        )
        s = shapes[0][2]
        assert dict(template)["LIN"] and dict(template)["APPEND"] and group == (128, 1, 1)
        assert dict(template)["RDIMS"] == 128 and not dict(template)["RTRAD"]
        assert grid == ((s + 5) * rows * 128, 1, 1)
        # (whole tiles a split: chunks rounded up can leave a few splits fewer)
        slots = factor * mma_decode.NUM_SMS_GUESS
        assert 0.9 * slots < s * rows <= slots
        rows_grid = mma_decode._split_plan(*args, fp, None, factor, 4, True, True, False, 1, True,
                                           *SHORT)  # fmt: skip
        assert rows_grid[3][0][2] >= s  # the rows grid rounds the split count up


def test_pipelined_splits_give_each_warp_four_super_tiles_up_to_the_fill_rule():
    """The default layout (pipelined) past the short contexts: fewer, longer splits up to
    32K -- 2 super-tiles a warp up to a block an SM, 4 beyond -- the fill rule's one wave past
    that; the other layouts keep the fill rule (measured: session 14)."""
    tunables = (None, 2, 4, True, True, True, 4, True, 0, 8)  # SHORT_BODY 0: that rule off
    chan, aff = ((2, 4, 128), (0, 4, 128)), ((0, 4, 64), (0, 4, 128))
    got = {n: mma_decode._row_splits(*chan, 1, 32, 8, 128, n, None, tunables)[1]
           for n in (4033, 16321, 32705, 65473, 131009)}  # fmt: skip
    assert got == {4033: 4, 16321: 16, 32705: 16, 65473: 32, 131009: 32}
    # 2 KV heads: 2 rows, a block an SM is 66 splits
    two = {n: mma_decode._row_splits(*chan, 1, 16, 2, 128, n, None, tunables)[1]
           for n in (4033, 32705, 131009)}  # fmt: skip
    assert two == {4033: 4, 32705: 32, 131009: 64}
    assert mma_decode._row_splits(*chan, 1, 32, 8, 128, 300, None, tunables)[1] == 1  # 1 tile
    # each warp of the 16 splits at 32K has 4 super-tiles of 128 positions
    assert 16 * 4 * 4 * 128 >= 32705 > 15 * 4 * 4 * 128
    # per-vector keys, and the pipeline off: the fill rule as before
    fill = mma_decode.num_splits(32705, 8, 4, fill=True)
    assert mma_decode._row_splits(*aff, 1, 32, 8, 128, 32705, None, tunables)[1] == fill > 16
    off = (None, 2, 4, True, False, True, *REST)
    assert mma_decode._row_splits(*chan, 1, 32, 8, 128, 32705, None, off)[1] == 32


def test_short_contexts_take_more_shorter_splits_and_long_ones_the_rule():
    """Up to SHORT_BODY positions and SHORT_ROWS rows the pipelined layout takes the fill
    rule at 3 blocks an SM with one super-tile a warp (measured in Llama decode steps, session
    24); past either, and for the other layouts, the rule as before."""
    tunables = (None, 2, 4, True, True, True, *REST)
    chan, aff = ((2, 4, 128), (0, 4, 128)), ((0, 4, 64), (0, 4, 128))
    got = {n: mma_decode._row_splits(*chan, 1, 32, 8, 128, n, None, tunables)[1]
           for n in (4033, 16321, 32705, 49152, 49153, 131009)}  # fmt: skip
    # 8 rows, 49 blocks a row at 3 an SM; a warp's super-tile 128 positions, 4 warps
    assert got == {4033: 8, 16321: 32, 32705: 43, 49152: 48, 49153: 25, 131009: 32}
    assert 43 * 768 >= 32705 > 42 * 768  # 43 splits of 6 super-tiles (1.5 a warp)
    # batch 2: 16 rows, past SHORT_ROWS -- the rule's 16 splits at 32K
    assert mma_decode._row_splits(*chan, 2, 32, 8, 128, 32705, None, tunables)[1] == 16
    # GQA 8: 43 splits would have the join merge 43 x 8 x 128 > FUSED_MAX_TAIL floats (two
    # launches, not measured): the rule's 16; at 4K its 8 splits fit, so the short rule
    gqa8 = {n: mma_decode._row_splits(*chan, 1, 64, 8, 128, n, None, tunables)[1]
            for n in (4033, 32705)}  # fmt: skip
    assert gqa8 == {4033: 8, 32705: 16}
    assert 43 * 8 * 128 > mma_decode.FUSED_MAX_TAIL >= 8 * 8 * 128
    # per-vector keys (not pipelined): the fill rule at 2 blocks an SM, as before
    fill = mma_decode.num_splits(32705, 8, 4, fill=True)
    assert mma_decode._row_splits(*aff, 1, 32, 8, 128, 32705, None, tunables)[1] == fill


def test_only_the_default_layout_is_pipelined():
    ch, aff = mma_decode.KEY_LAYOUTS["channel"], mma_decode.VALUE_LAYOUTS["affine"]
    assert mma_decode.pipelined((ch, 4, 128), (aff, 4, 128), 128, 8)
    assert mma_decode.pipelined((ch, 4, 256), (aff, 4, 64), 64, 8)
    assert not mma_decode.pipelined((ch, 3, 128), (aff, 4, 128), 128, 8)  # 3-bit keys
    assert not mma_decode.pipelined((ch, 4, 64), (aff, 4, 128), 128, 8)  # groups < a tile
    assert not mma_decode.pipelined((ch, 4, 128), (aff, 4, 64), 128, 8)  # 2 value groups
    assert not mma_decode.pipelined((ch, 4, 128), (aff, 4, 256), 256, 4)  # D 256
    assert not mma_decode.pipelined((0, 4, 64), (aff, 4, 64), 64, 4)  # per-vector keys


def test_compact_kernel_source_keeps_the_code():
    from services.turboquant.kernels.mma_source import MMA_HEADER, compact

    snippet = '#include <a.h>  // kept\n  int x = 1;  // gone\n\n  f("a // b");  // gone\n'
    assert compact(snippet) == '#include <a.h>  // kept\nint x = 1;\nf("a // b");\n'

    def tokens(src):  # comments dropped (no string literal in the header holds //)
        return re.findall(r"\w+|[^\w\s]", re.sub(r"//[^\n]*", "", src))

    small = compact(MMA_HEADER)
    assert tokens(small) == tokens(MMA_HEADER) and len(small) < 0.8 * len(MMA_HEADER)


def test_v4_super_tile_rule():
    ch, aff = mma_decode.KEY_LAYOUTS["channel"], mma_decode.KEY_LAYOUTS["affine"]
    assert mma_decode.steps_for(ch, 128) == 8 and mma_decode.steps_for(ch, 256) == 4
    assert mma_decode.steps_for(aff, 128) == 4


@pytest.mark.parametrize("steps", [4, 8])
def test_v4_splits_cover_the_context_without_empty_splits(rng, steps):
    tile = 16 * steps
    for length in [1, 63, 64, 65, *rng.integers(2, 300_000, size=50).tolist()]:
        for blocks in [1, 2, 8, 16, 600]:
            s = mma_decode.num_splits(length, blocks, steps)
            chunk = math.ceil(math.ceil(length / s) / tile) * tile  # the kernel's own formula
            assert (s - 1) * chunk < length <= s * chunk, (length, blocks, s, chunk)


def base_name(name: str) -> str:
    """A kernel's name without the fp dtype and source digest mma_decode adds to it."""
    return re.sub(r"(_(float16|bfloat16|float32))?_[0-9a-f]{12}$", "", name)


def baked_template(source: str) -> dict:
    """The template arguments written into a kernel body (jit.template_lines), dtypes as
    MLX dtypes."""
    from services.turboquant.kernels.jit import CUDA_TYPES

    dtypes = {c: getattr(mx, n) for n, c in CUDA_TYPES.items()}
    t = {}
    for line in source.split("\n\n", 1)[0].splitlines():  # written lines, then a blank one
        m = re.fullmatch(r"  (constexpr int|constexpr bool|using) (\w+) = (\w+);", line)
        if not m:
            return {}  # no template written in
        kind, name, value = m.groups()
        t[name] = (
            dtypes[value] if kind == "using" else int(value) if "int" in kind else value == "true"
        )
    return t


def header_text(kernel) -> str:
    """A kernel's header with its ``#include`` of a tqstack header file resolved."""
    m = re.fullmatch(r'#include "(.*/tq_[0-9a-f]{12}\.cuh)"\n', kernel.header)
    return open(m.group(1)).read() if m else kernel.header


class _RecordedKernel:
    """Stands in for ``mx.fast.cuda_kernel`` on any device: records each launch and returns
    zeros of the requested outputs. A launch's template is what the call passes plus what
    is written into the body; ``passed_template``: the call's alone (for NVRTC)."""

    launches: list = []
    outputs: list = []  # each launch's outputs, in the order of ``launches``

    def __init__(self, name, input_names, output_names, source, header="", **kw):
        self.name, self.input_names, self.output_names = name, input_names, output_names
        self.source, self.header = source, header
        self.shared_memory = kw.get("shared_memory", 0)

    def __call__(self, *, inputs, grid, threadgroup, output_shapes, output_dtypes,
                 template=None, init_value=None):  # fmt: skip
        self.passed_template = list(template or [])
        t = {**baked_template(self.source), **dict(self.passed_template)}
        self.launches.append((self, inputs, t, grid, threadgroup, output_shapes))
        outs = [mx.zeros(sh, dtype=dt) for sh, dt in zip(output_shapes, output_dtypes, strict=True)]
        self.outputs.append(outs)
        return outs


@pytest.fixture
def recorded_kernels(monkeypatch):
    mma_decode.clear_kernel_caches()
    monkeypatch.setattr(mx.fast, "cuda_kernel", _RecordedKernel)
    _RecordedKernel.launches, _RecordedKernel.outputs = [], []
    yield _RecordedKernel.launches
    mma_decode.clear_kernel_caches()  # no stand-in outlives the test


@pytest.mark.parametrize(
    "config,dim",
    [
        (dict(key_quantizer="channel", group_size=128, sink_tokens=1), 128),  # the default
        (dict(sink_tokens=2), 64),  # per-vector keys with a centre
        (dict(quantizer="codebook", key_bits=3, value_bits=3), 256),
    ],
)
def test_every_launch_gets_what_its_source_names(recorded_kernels, config, dim):
    """The kernels only compile on a CUDA device; here, on any device, each launch of a
    decode layer must pass one input per declared name and every template parameter the
    source and header use (a missing one is an NVRTC error only a GPU run would show)."""
    from services.turboquant.cache import JoinWorkspace
    from services.turboquant.kernels.mma_source import compact

    q, keys, values = _packed(config, dim, length=700)
    q = q.astype(mx.float16)
    # No join workspace (as off CUDA: the cache makes one only there): split + join, then
    # the body alone; then with one (as on CUDA), where the plan may fuse the join.
    keys = dataclasses.replace(keys, workspace=None)
    out = mma_decode.mma_decode_layer(q, keys, values, 0.1, mx.zeros((q.shape[1],)))
    body = mma_decode.mma_body_attention(q.astype(mx.float32), keys, values, 0.1)
    assert out.shape == q.shape and out.dtype == q.dtype and body[1].shape == (1, 8, 1, 1)
    with_work = dataclasses.replace(keys, workspace=JoinWorkspace())
    fused = mma_decode.mma_decode_layer(q, with_work, values, 0.1, mx.zeros((q.shape[1],)))
    assert fused.shape == q.shape and fused.dtype == q.dtype
    names = [base_name(k.name) for k, *_ in recorded_kernels]
    segments = [x for x in (keys.head, keys.tail) if x is not None and x.shape[2]]
    full_precision = bool(segments)
    layer = ["tq_mma_decode_split"]
    assert names[:4] == layer + [
        "tq_mma_decode_join",
        "tq_mma_decode_split",
        "tq_mma_decode_combine",
    ]
    assert names[4:] == layer  # the join fused into the split launch (FUSED_JOIN)
    split, body_split = recorded_kernels[0], recorded_kernels[2]
    chunks = sum(-(-x.shape[2] // 16) for x in segments)  # the sink's, then the tail's
    # the layer's split grid (1-D): the body's splits of every row, then one block per chunk
    # and row; the body-only launch (mma_body_attention): the same splits, nothing after them
    hkv = keys.parts[0].shape[1]
    rows = q.shape[0] * hkv * -(-(q.shape[1] // hkv) // 8)
    assert split[3][0] == body_split[3][0] + chunks * rows * split[4][0]
    assert split[3][1:] == (1, 1) and split[5][0] == body_split[5][0]
    if full_precision:
        assert split[5][2] == (1, 8, chunks, dim) and split[5][3] == (1, 8, chunks, 2)
    for kernel, inputs, template, grid, threadgroup, _ in recorded_kernels:
        assert len(inputs) == len(kernel.input_names)
        # Upper-case names the source uses but neither declares nor #defines (in itself or
        # in the header) must come from the template.
        code = compact(kernel.source)  # comments say M, H, ...
        used = set(re.findall(r"\b[A-Z][A-Z0-9_]*\b", code))
        declared = {
            name.strip().split()[0]
            for decl in re.findall(r"\b(?:int|float|bool)\s+([^;=()]+)", code)
            for name in decl.split(",")
        }
        defined = set(re.findall(r"#define\s+(\w+)", header_text(kernel) + code))
        optional = set(re.findall(r"#ifn?def\s+(\w+)", code))  # e.g. TQM_TRACE (a bench's)
        missing = used - declared - defined - optional - set(template)
        assert not missing, (kernel.name, missing)
        assert all(g % t == 0 for g, t in zip(grid, threadgroup, strict=True))
        assert threadgroup[0] * threadgroup[1] * threadgroup[2] <= 1024
    t = split[2]
    assert t["QROT"] and t["QT"] == mx.float16 and t["D"] == dim  # the kernel rotates q
    assert (t["HAS_HEAD"], t["HAS_TAIL"]) == tuple(
        x is not None and x.shape[2] > 0 for x in (keys.head, keys.tail)
    )
    # the default layout stages its tiles in dynamic shared memory, the others only the
    # full-precision chunks (in the PIPE rings when there are some)
    assert t["PIPE"] == (config.get("key_quantizer") == "channel")
    pipe = mma_decode.pipeline_smem(dim, t["WARPS"]) if t["PIPE"] else 0
    fp_smem = max(mma_decode.fp_chunk_smem(dim), 48 * 1024) if full_precision else 0
    assert split[0].shared_memory == max(pipe, fp_smem) and body_split[0].shared_memory == pipe
    assert split[5][0][2] * rows * 32 * t["WARPS"] == body_split[3][0]  # a block a split and row
    # the split source instantiates the device template with exactly these parameters
    params = re.search(r"mma_decode_split<([^>]*)>", split[0].source).group(1)
    names = [p.strip() for p in params.split(",")]
    assert names == [n for n in t if n in names]
    # each input is the array its name says (a swap passes the counts above but reads
    # the wrong memory on the GPU)
    expected = {
        "tq_mma_decode_split": dict(q=q, kw=keys.parts[0], ks=keys.parts[1], vw=values.parts[0],
                                    vs=values.parts[1], signs=keys.rotation.signs, kh=keys.head,
                                    vh=values.head, kt=keys.tail, vt=values.tail),
    }  # fmt: skip
    for kernel, inputs, *_ in recorded_kernels[: len(layer)]:
        by_name = dict(zip(kernel.input_names, inputs, strict=True))
        for name, array in expected.get(base_name(kernel.name), {}).items():
            if array is not None and array.shape[-2:] != (0, dim):  # empty segment: not passed
                assert by_name[name] is array, (kernel.name, name)
    # the join merges what the split kernel's blocks wrote, and returns the layer's output
    join, outputs = recorded_kernels[len(layer)], _RecordedKernel.outputs
    by_name = dict(zip(join[0].input_names, join[1], strict=True))
    assert by_name["o_part"] is outputs[0][0] and by_name["ml_part"] is outputs[0][1]
    if full_precision:
        assert by_name["fp_o"] is outputs[0][2] and by_name["fp_ml"] is outputs[0][3]
    assert join[2]["HAS_FP"] == full_precision and by_name["signs"] is keys.rotation.signs
    assert out is outputs[len(layer)][0]
    # what a plan does not read is not passed (MLX's host work grows with each argument)
    codebook = config.get("quantizer") == "codebook"
    split_names = set(split[0].input_names) | set(split[0].output_names)
    assert ({"lut_k", "lut_v"} <= split_names) == codebook
    assert ({"kb", "vb"} & split_names == set()) == codebook
    assert ({"kh", "vh", "kt", "vt", "fp_o", "fp_ml"} & split_names != set()) == full_precision
    assert set(body_split[0].input_names).isdisjoint({"kh", "vh", "kt", "vt", "signs"})
    assert ("cshift" in join[0].input_names) == (keys.center is not None)


def test_install_only_on_cuda():
    assert install() == cuda_available()
    if cuda_available():
        from services.turboquant.attention import set_body_decode_kernel, set_layer_decode_kernel

        set_body_decode_kernel(None)
        set_layer_decode_kernel(None)


# ----------------------------------------------------------------- CUDA kernel
cuda = pytest.mark.skipif(not cuda_available(), reason="needs MLX on a CUDA GPU")

SHAPES = [(1, 32, 8, 128), (2, 16, 2, 256), (1, 8, 8, 64), (1, 28, 4, 128), (1, 4, 1, 32)]
FORMATS = [
    ("affine", 4, 4, 64),
    ("affine", 8, 8, 64),
    ("affine", 3, 3, 64),
    ("affine", 2, 2, 32),
    ("affine", 8, 4, 128),
    ("codebook", 4, 4, 0),
    ("codebook", 3, 3, 0),
    ("codebook", 2, 2, 0),
    ("codebook", 4, 3, 0),
]


@cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}{f[1]}{f[2]}g{f[3]}")
@pytest.mark.parametrize("length", [1, 77, 1000, 4099])
def test_kernel_matches_float64_reference(rng, shape, fmt, length):
    bsz, hq, hkv, d = shape
    qz, kb, vb, gs = fmt
    case = make_case(
        rng, batch=bsz, q_heads=hq, kv_heads=hkv, dim=d, length=length, quantizer=qz,
        key_bits=kb, value_bits=vb, group_size=min(gs or 64, d),
        capacity_extra=int(rng.integers(1, 300)), sinks=bool(length % 2),
    )  # fmt: skip
    ref = case.reference()
    # Default launch, forced splits (some empty), another block/tile shape.
    for kw in ({}, {"splits": 7}, {"tpb": 128, "tile": 128}):
        out = fused_decode.fused_decode_attention(
            case.q_rot, case.keys, case.values, case.scale, poison=True, **case.kwargs(), **kw
        )
        err = reference.rel_error(np.array(out), ref)
        assert err <= TOL, (kw, err)  # NaN (an unwritten element) fails too


# ----------------------------------------------------------------- body kernel join (everywhere)
def _portable_body(q_rot, keys, values, scale):
    """What a body kernel returns, computed with MLX ops: (normalised out, base-2 lse)."""
    from services.turboquant.quantizers import dequantize

    k, v = dequantize(keys.parts, keys.spec), dequantize(values.parts, values.spec)
    b, hq, _, d = q_rot.shape
    n_kv = k.shape[1]
    z = (q_rot.reshape(b, n_kv, hq // n_kv, d) @ k.swapaxes(-1, -2)) * (scale * math.log2(math.e))
    m = mx.max(z, axis=-1, keepdims=True)
    p = mx.exp((z - m) * math.log(2))
    s = mx.sum(p, axis=-1, keepdims=True)
    return ((p @ v) / s).reshape(b, hq, 1, -1), (m + mx.log2(s)).reshape(b, hq, 1, 1)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(key_quantizer="channel", group_size=128, sink_tokens=1),  # the default layout
        dict(sink_tokens=2, window=40),  # per-vector keys with a centre, sink and tail
        dict(),  # the plain layout: body only (centre and learned sinks still count)
        dict(quantizer="codebook", key_bits=3, value_bits=3, sink_tokens=1),
    ],
    ids=["default", "sink-tail-centre", "plain", "codebook"],
)
@pytest.mark.parametrize("sinks", [False, True])
def test_a_body_kernel_is_joined_with_the_full_precision_segments(rng, cfg, sinks):
    from services.turboquant import TurboQuantConfig
    from services.turboquant.attention import set_body_decode_kernel, turboquant_attention
    from services.turboquant.kernels.cases import cache_case

    case = cache_case(
        rng, TurboQuantConfig(**cfg), batch=2, q_heads=8, kv_heads=2, dim=64, length=300,
        sinks=sinks,
    )  # fmt: skip
    calls = []

    def body(q_rot, keys, values, scale):
        calls.append(keys.n_body)
        return _portable_body(q_rot, keys, values, scale)

    old = set_body_decode_kernel(body)
    try:
        out = turboquant_attention(
            case.queries, case.keys, case.values, case.scale, None, case.sinks
        )
    finally:
        set_body_decode_kernel(old)
    assert calls and calls[0] == case.keys.n_body > 0
    # float16 output: its rounding is the error floor.
    assert reference.rel_error(np.array(out.astype(mx.float32)), case.reference()) < 1e-3


V4_LAYOUTS = {
    "default": dict(key_quantizer="channel", group_size=128, sink_tokens=1),
    "channel-k3v3-g64-window": dict(key_quantizer="channel", key_bits=3, value_bits=3,
                                    sink_tokens=1, window=64),
    "plain-affine-k4v4": dict(),
    "affine-k8v2-g32-sink": dict(key_bits=8, value_bits=2, group_size=32, sink_tokens=2),
    "codebook-k3v3": dict(quantizer="codebook", key_bits=3, value_bits=3),
}  # fmt: skip


@cuda
@pytest.mark.parametrize("shape", [(1, 32, 8, 128), (2, 16, 2, 256), (1, 12, 1, 64)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
@pytest.mark.parametrize("layout", list(V4_LAYOUTS), ids=str)
@pytest.mark.parametrize("length", [300, 4099])
@pytest.mark.parametrize("fused", [False, True], ids=["join", "fused"])
def test_v4_layer_matches_float64_reference(rng, monkeypatch, shape, layout, length, fused):
    from services.turboquant import TurboQuantConfig
    from services.turboquant.attention import join_body, rotate
    from services.turboquant.kernels.cases import cache_case

    bsz, hq, hkv, d = shape
    c = cache_case(rng, TurboQuantConfig(**V4_LAYOUTS[layout]), batch=bsz, q_heads=hq,
                   kv_heads=hkv, dim=d, length=length, sinks=bool(length % 2))  # fmt: skip
    assert mma_decode.supports(c.queries, c.keys, c.values)
    monkeypatch.setattr(mma_decode, "FUSED_JOIN", fused)
    monkeypatch.setattr(mma_decode, "FUSED_MAX_WORK", None)  # fused at any length
    assert (c.keys.workspace is not None) or not fused  # on CUDA every cache layer has one
    ref = c.reference()
    q_rot = rotate(c.queries, c.keys.rotation)
    for splits in (None, 7):  # 7: some splits empty
        out = mma_decode.mma_decode_layer(
            c.queries, c.keys, c.values, c.scale, c.sinks, splits=splits, poison=True
        )
        assert reference.rel_error(np.array(out.astype(mx.float32)), ref) <= 5e-3
    body = mma_decode.mma_body_attention(q_rot, c.keys, c.values, c.scale, poison=True)
    out = join_body(c.queries, q_rot, body, c.keys, c.values, c.scale, c.sinks)
    assert reference.rel_error(np.array(out), ref) <= 5e-3  # float16 operands on tensor cores


@cuda
@pytest.mark.parametrize("shape", [(1, 32, 8, 128), (1, 12, 1, 64), (2, 64, 4, 128)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
@pytest.mark.parametrize("length", [300, 4099])
def test_the_staged_join_matches_float64_reference(rng, monkeypatch, shape, length):
    """mma_decode.JOIN_STAGE: the fused join reads its row's partials through shared memory
    in batches of at most 64 rows a warp -- one batch, several (40, 70 splits), empty splits
    among them (7 at 300 positions), GQA 4, 12 and 16 (two heads a warp)."""
    from services.turboquant import TurboQuantConfig
    from services.turboquant.kernels.cases import cache_case

    bsz, hq, hkv, d = shape
    c = cache_case(rng, TurboQuantConfig(**V4_LAYOUTS["default"]), batch=bsz, q_heads=hq,
                   kv_heads=hkv, dim=d, length=length, sinks=bool(length % 2))  # fmt: skip
    monkeypatch.setattr(mma_decode, "FUSED_JOIN", True)
    monkeypatch.setattr(mma_decode, "FUSED_MAX_WORK", None)
    monkeypatch.setattr(mma_decode, "JOIN_STAGE", True)
    ref = c.reference()
    for splits in (None, 7, 40, 70):
        out = mma_decode.mma_decode_layer(
            c.queries, c.keys, c.values, c.scale, c.sinks, splits=splits, poison=True
        )
        assert reference.rel_error(np.array(out.astype(mx.float32)), ref) <= 5e-3, splits


@cuda
@pytest.mark.parametrize("rope_smem", [False, True], ids=["partner-loads", "rope-smem"])
def test_the_kernels_rope_matches_mlxs_and_the_tail_gets_the_rotated_key(monkeypatch, rope_smem):
    """The step's RoPE applied by the split kernel (rope_fusion) on the pipelined shapes --
    Llama 3.1's rope at 32/8 heads of 128 (out to 131K positions: angles past sincosf's fast
    range), a traditional one at 64/4 -- against MLX's rope of the same query and key, one
    launch a layer and two, and the rotated key written into the tail
    (bench/attention_gpu.py's check run 12); with mma_decode.ROPE_SMEM too."""
    from bench.attention_gpu import MMA_SHAPES, run_append_checks

    monkeypatch.setattr(mma_decode, "ROPE_SMEM", rope_smem)
    rows = run_append_checks(
        np.random.default_rng(7), rope=True, shapes=(MMA_SHAPES[0], MMA_SHAPES[4]),
        layouts=["default k4v4 chan g128 s1"],
    )  # fmt: skip
    assert len(rows) == 8 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_kernel_names_change_with_their_source(recorded_kernels, monkeypatch):
    """MLX 0.32 keeps compiled kernels on disk under their name and template arguments, not
    their source (MLX_PTX_CACHE_DIR): our names carry a digest of the source, so an edited
    kernel (an upgrade, another branch on the same machine) never runs an older build; and
    the split kernel's carries the sink/tail dtype, which types inputs of its signature."""
    q, keys, values = _packed(dict(key_quantizer="channel", group_size=128, sink_tokens=1))
    q = q.astype(mx.float16)
    keys = dataclasses.replace(keys, workspace=None)  # split + join, on CUDA too (no fusion)

    def layer_names():
        recorded_kernels.clear()
        mma_decode.clear_kernel_caches()
        mx.eval(mma_decode.mma_decode_layer(q, keys, values, 0.1))
        return [k.name for k, *_ in recorded_kernels]

    split, join = layer_names()
    assert (split, join) == tuple(layer_names())  # the same source, the same names
    monkeypatch.setattr(mma_decode, "MMA_SPLIT_SOURCE", mma_decode.MMA_SPLIT_SOURCE + "\n")
    split2, join2 = layer_names()
    assert split2 != split and base_name(split2) == base_name(split) and join2 == join
    assert split.startswith("tq_mma_decode_split_float16_")
    t = tuple(dict(recorded_kernels[0][2]).items())
    bf16, f16 = mma_decode._split_kernel(t, 0, "bfloat16")[0], mma_decode._split_kernel(t, 0)[0]
    assert bf16.name != f16.name


def test_a_header_file_is_written_once_by_digest_and_again_if_removed(monkeypatch, tmp_path):
    from services.turboquant.kernels import jit

    monkeypatch.setattr(jit, "include_dir", lambda: tmp_path / "cuda")
    one = "// one\n"
    line = jit.header_include(one)
    path = tmp_path / "cuda" / f"tq_{jit.digest(one)}.cuh"
    assert line == f'#include "{path}"\n' and path.read_text() == "// one\n"
    assert jit.header_include("// two\n") != line  # another header, another file
    path.unlink()  # a temp-file cleaner ran
    assert jit.header_include("// one\n") == line and path.read_text() == "// one\n"
    assert sorted(p.suffix for p in path.parent.iterdir()) == [".cuh", ".cuh"]  # no leftovers
    path.write_text("// changed\n")  # another version, or someone else's code
    assert jit.header_include(one) == line and path.read_text() == one
    path.parent.chmod(0o777)  # a directory others can write to: no file is trusted
    assert jit.header_include(one) == one
    path.parent.chmod(0o700)
    monkeypatch.setattr(jit, "include_dir", lambda: tmp_path / 'no"quote')
    assert jit.header_include(one) == one  # a path #include cannot name: inline, as MLX does


def test_a_baked_kernel_is_launched_with_no_template(recorded_kernels):
    from services.turboquant.kernels import jit

    template = (("D", 128), ("OT", mx.bfloat16), ("HAS_FP", False))
    k = jit.baked_kernel("tq_x", ("a",), ("out",), "  out[0] = a[0];\n", "// h\n", template, False)
    assert k is jit.baked_kernel("tq_x", ("a",), ("out",), "  out[0] = a[0];\n", "// h\n",
                                 template, False)  # fmt: skip
    assert k.source == (
        "  constexpr int D = 128;\n  using OT = __nv_bfloat16;\n  constexpr bool HAS_FP = false;\n"
        "\n  out[0] = a[0];\n"
    )
    assert baked_template(k.source) == dict(template)
    other = jit.baked_kernel("tq_x", ("a",), ("out",), "  out[0] = a[0];\n", "// h\n",
                             (("D", 64),), False)  # fmt: skip
    assert base_name(other.name) == base_name(k.name) == "tq_x" and other.name != k.name
    q, keys, values = _packed(dict(key_quantizer="channel", group_size=128, sink_tokens=1))
    keys = dataclasses.replace(keys, workspace=None)  # split + join, on CUDA too (no fusion)
    mma_decode.mma_decode_layer(q.astype(mx.float16), keys, values, 0.1)
    assert [k.passed_template for k, *_ in recorded_kernels] == [[], []]
    assert all(k.header.startswith('#include "') for k, *_ in recorded_kernels)


@pytest.mark.parametrize(
    "config,dim",
    [
        (dict(key_quantizer="channel", group_size=128, sink_tokens=1), 128),  # the default
        (dict(sink_tokens=2), 64),  # per-vector keys with a centre
    ],
)
def test_the_fused_join_is_one_launch_that_takes_the_joins_inputs(recorded_kernels, monkeypatch,
                                                                    config, dim):  # fmt: skip
    import dataclasses

    monkeypatch.setattr(mma_decode, "TILES_PER_WARP", 1)  # (several splits at this length)
    q, keys, values = _packed(config, dim, length=700)
    q = q.astype(mx.float16)
    from services.turboquant.cache import JOIN_COUNTER_ROWS, JoinWorkspace

    work = JoinWorkspace()
    keys = dataclasses.replace(keys, workspace=work)
    sinks = mx.zeros((q.shape[1],))
    monkeypatch.setattr(mma_decode, "FUSED_JOIN", False)
    assert mma_decode.mma_decode_layer(q, keys, values, 0.1, sinks) is not None
    assert len(recorded_kernels) == 2  # split + join
    recorded_kernels.clear()
    monkeypatch.setattr(mma_decode, "FUSED_JOIN", True)
    # up to FUSED_MAX_WORK key elements (batch x KV heads x body positions x head dim)
    # and FUSED_MAX_TAIL floats merged by a row's last block (splits x its heads x head dim)
    b, hq, hkv = q.shape[0], q.shape[1], keys.parts[0].shape[1]
    most = b * hkv * keys.n_body * dim
    monkeypatch.setattr(mma_decode, "FUSED_MAX_WORK", most)
    out = mma_decode.mma_decode_layer(q, keys, values, 0.1, sinks)
    ((kernel, inputs, t, grid, group, shapes),) = recorded_kernels
    rows, splits = mma_decode._row_splits(
        mma_decode.side_layout(keys), mma_decode.side_layout(values, values=True), b, hq, hkv,
        dim, keys.n_body, None, mma_decode._plan_tunables(),
    )  # fmt: skip
    chunks = grid[0] // (rows * 32 * mma_decode.WARPS) - splits  # the sink's and tail's
    n_fp = sum(-(-x.shape[2] // 16) for x in (keys.head, keys.tail) if x is not None)
    assert splits > 1 and chunks == n_fp
    tail = splits * min(8, hq // hkv) * dim
    assert tail <= mma_decode.FUSED_MAX_TAIL
    assert base_name(kernel.name) == "tq_mma_decode_split"
    assert t["FUSED"] and t["HAS_SINKS"] and t["HAS_CENTER"] == (keys.center is not None)
    by_name = dict(zip(kernel.input_names, inputs, strict=True))
    # the partials go to the layer's workspace, after its counters: one output, the joined one
    assert by_name["work"] is work.array and kernel.output_names == ["out"]
    assert work.floats >= mma_decode.work_floats(b * hq, splits, chunks, dim)
    assert work.array.size == JOIN_COUNTER_ROWS + work.floats
    assert ("cshift" in by_name) == (keys.center is not None)
    assert out is _RecordedKernel.outputs[-1][-1] and out.shape == q.shape and out.dtype == q.dtype
    # more work than FUSED_MAX_WORK (the GPU bounds the layer), rows beyond the counters,
    # or no workspace (not CUDA): the join launch again
    no_workspace = dataclasses.replace(keys, workspace=None)
    for most_work, most_tail, most_rows, k in (
        (most - 1, tail, 64, keys),
        (most, tail - 1, 64, keys),
        (None, 0, 0, keys),
        (None, 0, 64, no_workspace),
    ):
        monkeypatch.setattr(mma_decode, "FUSED_MAX_WORK", most_work)
        monkeypatch.setattr(mma_decode, "FUSED_MAX_TAIL", most_tail)
        monkeypatch.setattr(mma_decode, "JOIN_COUNTER_ROWS", most_rows)
        mma_decode.clear_kernel_caches()
        recorded_kernels.clear()
        mma_decode.mma_decode_layer(q, k, values, 0.1, sinks)
        assert [base_name(k.name) for k, *_ in recorded_kernels] == [
            "tq_mma_decode_split", "tq_mma_decode_join"
        ]  # fmt: skip


def test_each_cache_layer_has_its_own_join_workspace(monkeypatch):
    import copy

    from services.turboquant import TurboQuantKVCache, install_patch
    from services.turboquant import cache as cache_mod
    from services.turboquant.kernels import fused_decode

    install_patch()
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)  # as on CUDA
    monkeypatch.setattr(TurboQuantKVCache, "KEY_SCALES_GROUP_MAJOR", False)
    a, b = TurboQuantKVCache(), TurboQuantKVCache()
    wa = cache_mod.join_workspace(a)
    assert wa is cache_mod.join_workspace(a) and wa is not cache_mod.join_workspace(b)
    arr = wa.array
    assert arr.dtype == mx.float32 and not arr.any().item()
    assert arr.size == cache_mod.JOIN_COUNTER_ROWS + wa.floats
    c = copy.deepcopy(a)  # a copied cache (prompt-cache reuse) works in its own
    wc = cache_mod.join_workspace(c)
    assert wc is not wa and wc is cache_mod.join_workspace(c) and wc.array is not arr
    k = mx.zeros((1, 2, 300, 64), dtype=mx.float16)
    keys, values = a.update_and_fetch(k, k)
    assert keys.workspace is wa and values.workspace is None


def test_a_join_workspace_grows_in_zeros_and_only_when_short():
    from services.turboquant.cache import JOIN_COUNTER_ROWS, JOIN_WORK_GROW, JoinWorkspace

    w = JoinWorkspace()
    first = w.array
    assert w.floats == JOIN_WORK_GROW and w.at_least(JOIN_WORK_GROW) is first
    first[:8] = mx.array([1.0] * 8)  # (as a launch in flight might leave it)
    grown = w.at_least(JOIN_WORK_GROW + 1)
    assert grown is not first and w.array is grown and w.floats == 2 * JOIN_WORK_GROW
    assert grown.size == JOIN_COUNTER_ROWS + 2 * JOIN_WORK_GROW and not grown.any().item()
    assert w.at_least(5) is grown  # never shrinks
    assert JoinWorkspace(3 * JOIN_WORK_GROW - 1).floats == 3 * JOIN_WORK_GROW


def test_the_workspace_parts_keep_the_joins_float4_alignment():
    # the kernel's layout (tqm::work_span): each part rounded up to whole 128-byte lines
    assert mma_decode.work_floats(1, 1, 0, 64) == 64 + 32
    assert mma_decode.work_floats(32, 33, 3, 128) == 32 * 33 * 128 + 2112 + 32 * 3 * 128 + 192
    assert mma_decode.work_floats(3, 5, 1, 64) == 960 + 32 + 192 + 32  # 30 and 6 floats: a line
    for heads, s, c, d in ((1, 1, 0, 64), (7, 13, 3, 128), (3, 129, 5, 256)):
        w = mma_decode.work_floats(heads, s, c, d)
        assert w % mma_decode.MMA_WORK_ALIGN == 0 and w >= heads * (s + c) * (d + 2)


def test_off_cuda_a_cache_layer_has_no_join_workspace_and_the_answer_is_kept(monkeypatch):
    from services.turboquant import TurboQuantKVCache
    from services.turboquant import cache as cache_mod
    from services.turboquant.kernels import fused_decode

    asked = []
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: asked.append(1) or False)
    a = TurboQuantKVCache()
    assert cache_mod.join_workspace(a) is None and cache_mod.join_workspace(a) is None
    assert len(asked) == 1  # decode steps after the first only look it up
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)
    assert cache_mod.join_workspace(TurboQuantKVCache()) is not None
