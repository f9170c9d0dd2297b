"""Every kernel a decode layer launches compiles with NVRTC for the H200 (sm_90a), and the
split kernel keeps the resources its occupancy was measured with -- on any Linux x86-64
machine (tests/turboquant/nvrtc.py), so a kernel that would not build on the GPU machine
fails here first."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from services.turboquant.kernels import mma_decode
from services.turboquant.rope_fusion import DeferringRope, PendingRope, rope_spec

from . import nvrtc
from .test_kernels import _RecordedKernel, base_name

pytestmark = pytest.mark.skipif(
    not nvrtc.available(), reason="needs NVRTC 13 from PyPI (test extras, Linux x86-64)"
)

SM_REGISTERS, SM_SHARED = 65536, 228 * 1024  # an H100/H200 SM
BLOCK_RESERVED_SHARED = 1024  # the runtime's share of each block's shared memory


def blocks_per_sm(registers: int, threads: int, static_smem: int, dynamic_smem: int) -> int:
    """Resident blocks an SM by registers (allocated per warp in units of 256) and shared
    memory."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = SM_REGISTERS // (per_warp * threads // 32)
    by_smem = SM_SHARED // (static_smem + dynamic_smem + BLOCK_RESERVED_SHARED)
    return min(by_regs, by_smem)


CONFIGS = [  # (cache config, head dim): every layout the dispatch takes, sink/tail or not
    (dict(key_quantizer="channel", group_size=128, sink_tokens=1), 128),  # the default
    (dict(key_quantizer="channel", group_size=128, sink_tokens=1), 64),
    (dict(key_quantizer="channel", group_size=128, sink_tokens=1), 256),
    (dict(), 128),  # the paper's per-vector layout, key centre
    (dict(sink_tokens=2), 64),
    (dict(quantizer="codebook", key_bits=3, value_bits=3), 256),
    (dict(quantizer="codebook"), 128),
    (dict(key_bits=8, value_bits=2, group_size=32), 256),
]


@pytest.fixture(scope="module")
def launches():
    from services.turboquant import TurboQuantConfig
    from services.turboquant.cache import JoinWorkspace
    from services.turboquant.kernels.cases import cache_case

    saved = mx.fast.cuda_kernel
    mma_decode.clear_kernel_caches()
    mx.fast.cuda_kernel = _RecordedKernel
    _RecordedKernel.launches, _RecordedKernel.outputs = [], []
    try:
        for config, dim in CONFIGS:
            case = cache_case(np.random.default_rng(0), TurboQuantConfig(**config), batch=1,
                              q_heads=8, kv_heads=2, dim=dim, length=700, sinks=True)  # fmt: skip
            q = case.queries.astype(mx.float16)
            assert (
                mma_decode.mma_decode_layer(q, case.keys, case.values, 0.1, case.sinks) is not None
            )
            mma_decode.mma_body_attention(q, case.keys, case.values, 0.1)
            # the fused join (one launch a layer), as on CUDA
            keys = dataclasses.replace(case.keys, workspace=JoinWorkspace())
            joins = mma_decode.FUSED_JOIN, mma_decode.FUSED_MAX_WORK
            mma_decode.FUSED_JOIN, mma_decode.FUSED_MAX_WORK = True, None
            try:
                assert (
                    mma_decode.mma_decode_layer(q, keys, case.values, 0.1, case.sinks) is not None
                )
            finally:
                mma_decode.FUSED_JOIN, mma_decode.FUSED_MAX_WORK = joins
            if config.get("key_quantizer") == "channel":
                _append_launches(config, dim)
    finally:
        mx.fast.cuda_kernel = saved
        mma_decode.clear_kernel_caches()
    distinct = {}
    recorded = zip(_RecordedKernel.launches, _RecordedKernel.outputs, strict=True)
    for (kernel, inputs, template, *_), outputs in recorded:
        dtypes = [o.dtype for o in outputs]
        key = (
            kernel.name,
            kernel.shared_memory,
            repr(list(template.items())),
            tuple(str(a.dtype) for a in inputs),
        )
        distinct.setdefault(key, (kernel, inputs, template, dtypes))
    return list(distinct.values())


def _append_launches(config, dim):
    """A decode step whose new position the kernel writes (cache.TailAppend: a cache on
    CUDA, a channel-key tail), fused and in two launches."""
    from services.turboquant import TurboQuantConfig
    from services.turboquant.kernels import fused_decode
    from services.turboquant.kernels.cases import cache_case

    saved = fused_decode.cuda_available, mma_decode.FUSED_JOIN
    fused_decode.cuda_available = lambda: True  # (the cache's join workspace, as on CUDA)
    try:
        case = cache_case(np.random.default_rng(0), TurboQuantConfig(**config), batch=1,
                          q_heads=8, kv_heads=2, dim=dim, length=700, sinks=True, steps=3)  # fmt: skip
        assert case.keys.append is not None
        q = case.queries.astype(mx.float16)
        for fused in (True, False):
            mma_decode.FUSED_JOIN = fused
            assert (
                mma_decode.mma_decode_layer(q, case.keys, case.values, 0.1, case.sinks) is not None
            )
        # the query and new key pending their RoPE (rope_fusion): Llama's whole head, a
        # partial one (Qwen3.5: 64 of 256 dims), pairs of neighbours (traditional)
        raw_k, last = case.keys.append.k, case.cache.offset - 1
        for dims, traditional in ((dim, False), (64, dim != 256)):
            wrap = DeferringRope(nn.RoPE(dims, traditional), rope_spec(nn.RoPE(dims, traditional)))
            for fused in (True, False):
                mma_decode.FUSED_JOIN = fused
                case.keys.append.k = PendingRope(raw_k, wrap, last)
                out = mma_decode.mma_decode_layer(
                    PendingRope(q, wrap, last), case.keys, case.values, 0.1, case.sinks
                )
                assert out is not None and isinstance(case.keys.append.k, PendingRope)
    finally:
        fused_decode.cuda_available, mma_decode.FUSED_JOIN = saved


def test_every_launch_compiles_and_the_split_kernel_keeps_its_occupancy(launches):
    names = {base_name(k.name) for k, *_ in launches}
    assert names == {"tq_mma_decode_split", "tq_mma_decode_join", "tq_mma_decode_combine"}
    failures, seen = [], []
    # the template as the call passes it (ours are written into the body)
    sources = [nvrtc.kernel_source(k, i, k.passed_template, d) for k, i, _, d in launches]
    for (kernel, _, template, _), (cubin, log) in zip(
        launches, nvrtc.compile_many(sources), strict=True
    ):
        if cubin is None:
            failures.append((kernel.name, template, log[-2000:]))
            continue
        regs, static = nvrtc.cubin_resources(cubin)
        assert 0 < regs <= 255
        t = template
        if base_name(kernel.name) != "tq_mma_decode_split":
            continue
        threads = 32 * t["WARPS"]
        blocks = blocks_per_sm(regs, threads, static, kernel.shared_memory)
        seen.append((t["D"], t["PIPE"], regs, blocks))
        # The staged-tile kernel was measured with 3 blocks an SM (bench/gpu_notes.md,
        # session 5); the others with 2 (SPLIT_FACTOR).
        want = 3 if t["PIPE"] else 2
        assert blocks >= want, (t, regs, static, kernel.shared_memory)
    assert not failures, failures
    assert {(d, pipe) for d, pipe, *_ in seen} >= {(128, True), (64, True), (256, False)}
    appends = {(t["D"], t["FUSED"]) for k, _, t, _ in launches if t.get("APPEND")}
    assert appends == {(d, f) for d in (64, 128, 256) for f in (True, False)}
    # (their tails as whole buffers with the length in params: cache.BufferedTail)
    assert appends == {(t["D"], t["FUSED"]) for k, _, t, _ in launches if t.get("TLEN")}
    ropes = {(t["D"], t["RDIMS"], t["RTRAD"]) for k, _, t, _ in launches if t.get("RDIMS")}
    assert ropes == {(64, 64, False), (64, 64, True), (128, 128, False), (128, 64, True),
                     (256, 256, False), (256, 64, False)}  # fmt: skip


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(extra_inputs=14), dict(extra_inputs=14, strides=False),
     dict(extra_template=16), dict(outputs=4), dict(header="// pad\n" * 50)],
)  # fmt: skip
def test_dispatch_cost_kernels_compile(monkeypatch, kw):
    """bench/dispatch_cost.py's trivial kernels (what isolates MLX's per-call costs on the
    GPU) build as MLX would build them."""
    from bench.dispatch_cost import trivial_kernel

    monkeypatch.setattr(mx.fast, "cuda_kernel", _RecordedKernel)
    _RecordedKernel.launches, _RecordedKernel.outputs = [], []
    x = mx.zeros((256,), dtype=mx.float16)
    trivial_kernel(x, **kw)(x)
    ((kernel, inputs, template, *_),) = _RecordedKernel.launches
    assert len(inputs) == 1 + kw.get("extra_inputs", 0)
    src = nvrtc.kernel_source(kernel, inputs, template.items(), [mx.float16] * kw.get("outputs", 1))
    assert ("u0_strides" in src) == (kw.get("extra_inputs", 0) > 0 and kw.get("strides", True))
    cubin, log = nvrtc.compile_cubin(src)
    assert cubin is not None, log


def test_a_baked_launch_compiles_to_the_machine_code_of_a_templated_one(launches):
    """jit.baked_kernel includes the header from a file and writes the template into the
    body; the split kernel (default layout, with sink and tail) and its join compile to the
    same machine code as the same source sent whole with the template passed per call."""
    from types import SimpleNamespace

    from .test_kernels import header_text

    picked = [
        next(x for x in launches if base_name(x[0].name) == name and x[2]["D"] == 128 and flag(x[2]))
        for name, flag in [("tq_mma_decode_split", lambda t: t["PIPE"] and t["HAS_TAIL"]),
                           ("tq_mma_decode_join", lambda t: t["HAS_FP"])]
    ]  # fmt: skip
    for kernel, inputs, template, dtypes in picked:
        assert not kernel.passed_template and kernel.header.startswith("#include")
        written, body = kernel.source.split("\n\n", 1)
        assert written.count("\n") + 1 == len(template)  # every argument written in
        whole = SimpleNamespace(
            name=kernel.name, input_names=kernel.input_names, output_names=kernel.output_names,
            source=body, header=header_text(kernel),
        )  # fmt: skip
        baked, log = nvrtc.compile_cubin(nvrtc.kernel_source(kernel, inputs, [], dtypes))
        assert baked is not None, log
        sent, log = nvrtc.compile_cubin(
            nvrtc.kernel_source(whole, inputs, list(template.items()), dtypes)
        )
        assert sent is not None, log
        assert nvrtc.machine_code(baked) == nvrtc.machine_code(sent) != b""


def test_eight_warps_a_block_compile_for_the_default_layout(monkeypatch):
    """``mma_decode.WARPS`` = 8 (bench/split_sweep.py --warps 8: twice the warps of a block
    at the same block count) builds for the default layout, fused, with its chunk blocks."""
    from services.turboquant import TurboQuantConfig
    from services.turboquant.cache import JoinWorkspace
    from services.turboquant.kernels.cases import cache_case

    mma_decode.clear_kernel_caches()
    monkeypatch.setattr(mx.fast, "cuda_kernel", _RecordedKernel)
    monkeypatch.setattr(mma_decode, "WARPS", 8)
    _RecordedKernel.launches, _RecordedKernel.outputs = [], []
    try:
        case = cache_case(np.random.default_rng(0), TurboQuantConfig.recommended(), batch=1,
                          q_heads=32, kv_heads=8, dim=128, length=4000)  # fmt: skip
        keys = dataclasses.replace(case.keys, workspace=JoinWorkspace())
        mma_decode.mma_decode_layer(case.queries.astype(mx.float16), keys, case.values, 0.1)
    finally:
        mma_decode.clear_kernel_caches()
    ((kernel, inputs, t, grid, group, _),) = _RecordedKernel.launches
    assert t["WARPS"] == 8 and t["PIPE"] and t["FUSED"] and t["HAS_TAIL"] and group == (256, 1, 1)
    dtypes = [o.dtype for o in _RecordedKernel.outputs[0]]
    cubin, log = nvrtc.compile_cubin(nvrtc.kernel_source(kernel, inputs, [], dtypes))
    assert cubin is not None, log
    regs, static = nvrtc.cubin_resources(cubin)
    assert blocks_per_sm(regs, 256, static, kernel.shared_memory) >= 1


def test_the_value_steps_compile_looped_and_unrolled_and_keep_three_blocks_an_sm(monkeypatch):
    """``mma_decode.COMPACT_VALUES`` (the rule since session 16): the pipelined kernel's value
    product runs its steps in a loop (template CVAL); unrolled, as before, it still builds --
    D 64 (one code word a lane) and 128 (two), fused and in two launches, with the step's new
    position (APPEND) -- and both keep 3 blocks an SM (bench/gpu_notes.md, session 5)."""
    from services.turboquant import TurboQuantConfig
    from services.turboquant.kernels import fused_decode
    from services.turboquant.kernels.cases import cache_case

    monkeypatch.setattr(mx.fast, "cuda_kernel", _RecordedKernel)
    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)  # a join workspace
    config = TurboQuantConfig.recommended()
    resources = {}
    for dim in (64, 128):
        case = cache_case(np.random.default_rng(0), config, batch=1, q_heads=8, kv_heads=2,
                          dim=dim, length=700, steps=3)  # fmt: skip
        assert case.keys.append is not None
        q = case.queries.astype(mx.float16)
        for compact in (True, False):
            for fused in (True, False):
                monkeypatch.setattr(mma_decode, "COMPACT_VALUES", compact)
                monkeypatch.setattr(mma_decode, "FUSED_JOIN", fused)
                mma_decode.clear_kernel_caches()
                _RecordedKernel.launches, _RecordedKernel.outputs = [], []
                assert mma_decode.mma_decode_layer(q, case.keys, case.values, 0.1) is not None
                kernel, inputs, t, grid, group, _ = _RecordedKernel.launches[0]
                assert t["PIPE"] and t["APPEND"] and t["FUSED"] == fused
                assert t["CVAL"] == compact
                dtypes = [o.dtype for o in _RecordedKernel.outputs[0]]
                cubin, log = nvrtc.compile_cubin(nvrtc.kernel_source(kernel, inputs, [], dtypes))
                assert cubin is not None, log
                regs, static = nvrtc.cubin_resources(cubin)
                resources[(dim, compact, fused)] = blocks_per_sm(regs, group[0], static,
                                                                 kernel.shared_memory)  # fmt: skip
    mma_decode.clear_kernel_caches()
    assert min(resources.values()) >= 3, resources


def test_the_fused_split_launches_compile_as_trace_builds(launches):
    """bench/kernel_trace.py and step_profile --trace build the fused split kernel with
    TQM_TRACE (mma_decode.TRACE_AT): its marks, the join's among them, compile too (the
    other tests compile the product builds, where the marks are empty)."""
    fused = [x for x in launches if base_name(x[0].name) == "tq_mma_decode_split"]
    # one launch per path the marks take (staged tiles or not, RoPE in the kernel or not)
    paths = {(x[2]["PIPE"], x[2]["RDIMS"] > 0): x for x in fused if x[2]["FUSED"]}
    assert set(paths) == {(p, r) for p in (True, False) for r in (True, False)}
    sources = [
        "#define TQM_TRACE 4194304\n" + nvrtc.kernel_source(k, i, k.passed_template, d)
        for k, i, _, d in paths.values()
    ]
    built = zip(paths.values(), nvrtc.compile_many(sources), strict=True)
    failures = [(t, log[-2000:]) for (_, _, t, _), (cubin, log) in built if cubin is None]
    assert not failures, failures


def test_the_rope_from_shared_memory_compiles_at_three_blocks_an_sm(monkeypatch):
    """mma_decode.ROPE_SMEM: the pipelined launches that apply the query's RoPE (whole head,
    partial, traditional; fused or not) read its partners back from shared memory under
    launch bounds of 3 blocks an SM -- they compile, product and trace builds, and hold
    that occupancy; no other launch carries it."""
    monkeypatch.setattr(mx.fast, "cuda_kernel", _RecordedKernel)
    monkeypatch.setattr(mma_decode, "ROPE_SMEM", True)
    _RecordedKernel.launches, _RecordedKernel.outputs = [], []
    mma_decode.clear_kernel_caches()
    try:
        for dim in (64, 128, 256):
            _append_launches(CONFIGS[0][0], dim)
    finally:
        mma_decode.clear_kernel_caches()
    recorded = list(zip(_RecordedKernel.launches, _RecordedKernel.outputs, strict=True))
    splits = [(k, i, t, o) for (k, i, t, *_), o in recorded if t.get("RDIMS") is not None]
    taken = [x for x in splits if x[2].get("RSMEM")]
    assert all(t["PIPE"] and t["RDIMS"] > 0 for _, _, t, _ in taken)
    assert {(t["D"], t["RDIMS"], t["FUSED"]) for _, _, t, _ in taken} == {
        (d, r, f) for d, r in ((64, 64), (128, 128), (128, 64)) for f in (True, False)
    }
    assert not any(t["PIPE"] and t["RDIMS"] and not t.get("RSMEM") for _, _, t, _ in splits)
    sources = []
    for kernel, inputs, t, outputs in taken:
        header = kernel.header  # (an #include of a file holding it, where one can be written)
        if header.startswith("#include"):
            header = Path(header.split('"')[1]).read_text()
        assert "#define TQM_ROPE_SMEM 1" in header
        assert f"__launch_bounds__({32 * t['WARPS']}, {12 // t['WARPS']})" in header
        src = nvrtc.kernel_source(
            kernel, inputs, kernel.passed_template, [o.dtype for o in outputs]
        )
        sources += [src, "#define TQM_TRACE 4194304\n" + src]
    built = nvrtc.compile_many(sources)
    for (kernel, _, t, _), (cubin, log) in zip(taken, built[::2], strict=True):
        assert cubin is not None, log[-3000:]
        regs, static = nvrtc.cubin_resources(cubin)
        assert blocks_per_sm(regs, 32 * t["WARPS"], static, kernel.shared_memory) >= 3, t
    assert all(cubin is not None for cubin, _ in built[1::2]), [log[-2000:] for _, log in built]


@pytest.mark.parametrize("on", [True, False])
def test_the_staged_join_compiles_and_keeps_three_blocks_an_sm(monkeypatch, on):
    """mma_decode.JOIN_STAGE (the fused join's partials staged with cp.async; the default
    since session 25): the pipelined launches that take it compile, keep the occupancy the
    default layout was measured with, and only they carry its source; off, the same
    launches compile without it (the setting's A/B)."""
    from services.turboquant import TurboQuantConfig
    from services.turboquant.cache import JoinWorkspace
    from services.turboquant.kernels.cases import cache_case

    monkeypatch.setattr(mx.fast, "cuda_kernel", _RecordedKernel)
    monkeypatch.setattr(mma_decode, "FUSED_MAX_WORK", None)
    monkeypatch.setattr(mma_decode, "JOIN_STAGE", on)
    _RecordedKernel.launches, _RecordedKernel.outputs = [], []
    mma_decode.clear_kernel_caches()
    try:
        for config, dim in CONFIGS[:4]:  # the default layout at D 128 / 64 / 256, per-vector keys
            case = cache_case(np.random.default_rng(0), TurboQuantConfig(**config), batch=1,
                              q_heads=8, kv_heads=2, dim=dim, length=700, sinks=True)  # fmt: skip
            keys = dataclasses.replace(case.keys, workspace=JoinWorkspace())
            q = case.queries.astype(mx.float16)
            assert mma_decode.mma_decode_layer(q, keys, case.values, 0.1, case.sinks) is not None
    finally:
        mma_decode.clear_kernel_caches()
    splits = [x for x in _RecordedKernel.launches if base_name(x[0].name) == "tq_mma_decode_split"]
    flags = {(t["D"], t["PIPE"]): t.get("JSTG", False) for _, _, t, *_ in splits}
    assert flags == {(128, True): on, (64, True): on, (256, False): False, (128, False): False}
    recorded = zip(_RecordedKernel.launches, _RecordedKernel.outputs, strict=True)
    pipelined = [(k, i, t, o) for (k, i, t, *_), o in recorded if t.get("PIPE") and t["FUSED"]]
    assert len(pipelined) == 2  # D 128 and D 64
    for kernel, inputs, t, outputs in pipelined:
        src = nvrtc.kernel_source(
            kernel, inputs, kernel.passed_template, [o.dtype for o in outputs]
        )
        header = kernel.header  # (an #include of a file holding it, where one can be written)
        if header.startswith("#include"):
            header = Path(header.split('"')[1]).read_text()
        assert ("#define TQM_JOIN_STAGED 1" in header) == on
        cubin, log = nvrtc.compile_cubin(src)
        assert cubin is not None, log[-3000:]
        regs, static = nvrtc.cubin_resources(cubin)
        blocks = blocks_per_sm(regs, 32 * t["WARPS"], static, kernel.shared_memory)
        assert blocks >= 3, (regs, static)
