"""The sidecar builds every CUDA decode-kernel variant its model reaches before the first
request (services/turboquant/kernels/warm.py): on any machine, the sidecar engine's warm-up
on the real SmolLM2 weights with the cache as on CUDA and the kernels recorded, not run."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import pytest

from services.turboquant.kernels import fused_decode, mma_decode, warm

from .test_kernels import _RecordedKernel, base_name

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from bench.eval_ppl import load_float32

    return load_float32(smollm2_dir)


@pytest.fixture
def recorded_on_cuda(monkeypatch):
    from services.turboquant.attention import set_layer_decode_kernel
    from services.turboquant.kernels import dispatch

    monkeypatch.setattr(fused_decode, "cuda_available", lambda: True)
    monkeypatch.setattr(mx.fast, "cuda_kernel", _RecordedKernel)
    mma_decode.clear_kernel_caches()
    _RecordedKernel.launches, _RecordedKernel.outputs = [], []
    old = set_layer_decode_kernel(dispatch.mma_layer_kernel)
    yield _RecordedKernel.launches
    set_layer_decode_kernel(old)
    mma_decode.clear_kernel_caches()


def _variants(launches) -> set[tuple]:
    """(fused, tail, kernel-written tail, its RoPE by the kernel) of each split launch."""
    return {
        (t["FUSED"], t["HAS_TAIL"], t["APPEND"] and t["TLEN"], t["RDIMS"] > 0)
        for k, _, t, *_ in launches
        if base_name(k.name) == "tq_mma_decode_split"
    }


@pytest.mark.parametrize("group", [128, 64])
def test_the_warm_up_reaches_every_decode_variant_with_both_joins(smollm2, recorded_on_cuda, group):
    from services.sidecar.engine import Engine
    from services.sidecar.kv import KVBackend
    from services.turboquant import TurboQuantConfig, install_patch

    install_patch()
    model, tokenizer = smollm2
    backend = KVBackend(
        model=model, turboquant=True, tq_config=TurboQuantConfig.recommended(group_size=group)
    )
    engine = SimpleNamespace(backend=backend, loaded=SimpleNamespace(model=model))
    assert mma_decode.FUSED_JOIN
    Engine._warm_kernels(engine, tokenizer.encode("Hello, world.", add_special_tokens=False))
    assert mma_decode.FUSED_JOIN  # (restored)
    # (a kernel-written tail with the step's RoPE in the kernel or not: rope_fusion)
    want = {(f, tail, appended, rope) for f in (True, False)
            for tail, appended, rope in ((False, False, False), (True, False, False),
                                         (True, True, False), (True, True, True))}  # fmt: skip
    assert _variants(recorded_on_cuda) == want
    # and a request's generation afterwards builds nothing new: a longer one, past a block
    seen = {k.name for k, *_ in recorded_on_cuda}
    cache = backend.make_cache()
    from mlx_lm.generate import generate_step

    prompt = mx.array(tokenizer.encode("The quick brown fox. " * 40)[: 3 * group + 7])
    for _ in generate_step(prompt, model, max_tokens=group + 5, prompt_cache=cache):
        pass
    assert {k.name for k, *_ in recorded_on_cuda} == seen


def test_the_prompt_length_puts_a_block_step_two_tokens_in():
    # channel keys, groups of 128, one sink: the tail holds 125 after the prefill chunk
    n = warm.warm_prompt_len(128, 1, 0, 64)
    assert n == 255 and (n - 1 - 1) % 128 == 125
    assert warm.warm_prompt_len(64, 1, 32, 64) == 1 + 32 + 126
    assert warm.warm_prompt_len(1, 0, 0, 64) == 70  # per-vector keys: past the key centre
    # with the RoPE in the kernel: a second prompt whose appending step is past SMALL_INTS
    assert warm.warm_prompt_lens(128, 1, 0, 64, rope=True) == [n, n + 128]
    assert warm.warm_prompt_lens(64, 1, 0, 64, rope=True) == [127, 127 + 3 * 64]
    assert warm.warm_prompt_lens(128, 1, 0, 64, rope=False) == [n]
    assert warm.warm_prompt_lens(1, 0, 0, 64, rope=True) == [70]


def test_the_gpu_check_renders_both_runs(tmp_path, monkeypatch):
    import json

    from bench import warm_gpu

    written = {}
    monkeypatch.setattr("bench.report.write_section",
                        lambda name, title, body, **kw: written.update(name=name, body=body))  # fmt: skip
    runs = []
    for warm_first, built, slow in ((False, 7, 5313.59), (True, 7, 3.7)):
        p = tmp_path / f"{warm_first}.json"
        p.write_text(json.dumps(dict(warm=warm_first, warm_s=24.09 if warm_first else 0.0,
                                     kernels_after_warm=built if warm_first else 0,
                                     kernels_after_generation=built, slowest_step_ms=slow,
                                     median_step_ms=0.5)))  # fmt: skip
        runs.append(str(p))
    warm_gpu.render(",".join(runs), "GPU", "cmd")
    assert written["name"] == "kernel_warmup"
    assert "| no warm-up | 0.0 | 0 | 7 | 5313.6 | 0.50 |" in written["body"]
    assert "| warm-up first | 24.1 | 7 | 0 | 3.7 | 0.50 |" in written["body"]


@pytest.mark.parametrize("setting", [True, False])
def test_the_engine_warms_the_kernels_on_cuda_unless_told_not_to(smollm2, monkeypatch, setting):
    """TQ_WARM_KERNELS (default 1): the load's warm-up builds the kernels on CUDA only."""
    from services.config import Settings
    from services.sidecar.engine import Engine
    from services.sidecar.kv import KVBackend
    from services.turboquant import TurboQuantConfig, install_patch

    install_patch()
    model, tokenizer = smollm2
    backend = KVBackend(model=model, turboquant=True, tq_config=TurboQuantConfig.recommended())
    calls = []
    engine = SimpleNamespace(
        backend=backend, settings=Settings(tq_warm_kernels=setting),
        loaded=SimpleNamespace(model=model, tokenizer=tokenizer),
        _warm_kernels=lambda ids: calls.append(ids),
    )  # fmt: skip
    for cuda in (False, True):
        monkeypatch.setattr(fused_decode, "cuda_available", lambda cuda=cuda: cuda)
        Engine._warm_up(engine)
    assert len(calls) == (1 if setting else 0)
    assert Settings().tq_warm_kernels
