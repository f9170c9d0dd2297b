"""bench/step_profile.py on any machine: its steps run, ncu's CSV is read and summed as
the GPU's kernels say (the durations come from the GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import step_profile as sp

ROOT = Path(__file__).resolve().parents[2]

HEAD = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","gpu__time_duration.sum"'
UNITS_ROW = '"","","","","","","","{unit}"'


def _csv(path: Path, kernels: list[tuple[str, float]], unit: str = "nsecond") -> None:
    lines = ["==PROF== Connected to process 1 (python3)", HEAD, UNITS_ROW.format(unit=unit)]
    for i, (name, t) in enumerate(kernels):
        lines.append(f'"{i}","1","python3","h","{name}","1","7","{t:,}"')
    lines.append("==PROF== Disconnected from process 1")
    path.write_text("\n".join(lines) + "\n")


def test_kernel_names_shorten_and_fall_into_kinds():
    assert sp.short_name("void mlx::core::cu::gemv<__half, 128>(const __half*, int)") == "gemv"
    assert sp.short_name("tq_mma_decode_split_3f9a2c81d0") == "tq_mma_decode_split"
    assert sp.short_name("void cutlass::Kernel2<cutlass_80_tensorop<x<y>>>(Params)") == "Kernel2"
    assert sp.kind_of("tq_mma_decode_split") == "attention"
    assert sp.kind_of("sdpa_vector_2pass_1") == "attention"
    assert sp.kind_of("gemv") == "matmul"
    assert sp.kind_of("copy_gg") == "copy / update"
    assert sp.kind_of("rms_norm") == "other"


def test_a_folder_of_profiles_sums_each_cache_a_step(tmp_path):
    steps = 2
    fp16 = [("void mlx::core::cu::gemv<__half>(int)", 3000.0), ("sdpa_vector_2pass_1", 44000.0),
            ("copy_gg_inplace", 500.0)] * steps  # fmt: skip
    ours = [("void mlx::core::cu::gemv<__half>(int)", 3000.0), ("tq_mma_decode_split_ab12cd34", 31000.0),
            ("rms_norm", 1000.0)] * steps  # fmt: skip
    _csv(tmp_path / "fp16.csv", fp16)
    _csv(tmp_path / "tq-default.csv", [(n, t / 1000) for n, t in ours], unit="us")
    for cache in ("tq-default", "fp16"):
        meta = dict(model="llama-3.1-8b", cache=cache, context=32768, batch=1, steps=steps)
        (tmp_path / f"{cache}.json").write_text(json.dumps(meta))
    assert len(sp.read_ncu_csv(tmp_path / "fp16.csv")) == 3 * steps
    before = sp.read_ncu_csv(tmp_path / "tq-default.csv")
    sp.trim_ncu_csv(tmp_path / "tq-default.csv")  # only the columns read, the same kernels
    assert sp.read_ncu_csv(tmp_path / "tq-default.csv") == before
    assert (tmp_path / "tq-default.csv").read_text().splitlines()[
        0
    ] == '"ID","Kernel Name","gpu__time_duration.sum"'
    table, facts = sp.report(tmp_path)
    # per step: fp16 3 + 44 + 0.5 us, ours 3 + 31 + 1 (the units row scales each file)
    assert facts["gpu_us"] == {"fp16": 47.5, "tq-default": 35.0}
    assert facts["ceiling"] == {"tq-default": round(47.5 / 35.0, 3)}
    lines = table.splitlines()
    assert lines[0] == "| kernels | fp16: kernels / us a step | tq-default: kernels / us a step |"
    assert "| **attention** | 1 / 44.0 | 1 / 31.0 |" in lines
    assert "| **copy / update** | 1 / 0.5 | - |" in lines
    assert "| **all (the step's GPU time)** | 3 / 47.5 | 3 / 35.0 |" in lines
    # the costliest names follow the kinds, the larger of the two caches' first
    names = [ln.split("|")[1].strip() for ln in lines if ln.startswith("| `")]
    assert names[:2] == ["`sdpa_vector_2pass` (attention)", "`tq_mma_decode_split` (attention)"]


def test_the_profiled_steps_run_on_both_caches(tmp_path):
    """Without a GPU driver the steps run unprofiled: each cache's meta says how far it
    decoded (8 warm steps + 1 first, then the profiled ones)."""
    for cache in ("fp16", "tq-default"):
        out = subprocess.run(
            [sys.executable, "bench/step_profile.py", "--tiny", "--cache", cache,
             "--context", "300", "--steps", "3", "--out", str(tmp_path), "--trace"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        meta = json.loads((tmp_path / f"{cache}.json").read_text())
        assert meta["cache"] == cache and meta["steps"] == 3
        assert meta["offset"] == 300 + 9 + 3
        assert meta["kv_bytes"] > 0
        assert meta["traced"] == {}  # (--trace: no CUDA, no join workspace, nothing traced)


def test_the_benches_input_sets_keep_every_format_out_of_the_l2():
    from bench.attention_gpu import L2_BYTES, input_sets

    for n in (4096, 32768, 131072, 262144):
        fp16 = 2 * 8 * n * 128 * 2  # K + V, 8 KV heads, D 128
        sets = input_sets(fp16)
        assert 2 <= sets <= 64 and sets * fp16 <= 8e9
        if sets < 64 and sets * fp16 < 8e9:  # (else a cap)
            assert sets * fp16 / 5 >= 4 * L2_BYTES
    assert input_sets(2 * 8 * 4096 * 128 * 2) == 64  # 4K: the cap, still 3.4x the L2 in 3-bit codes
    assert input_sets(2 * 8 * 32768 * 128 * 2) == 10  # 32K: was 2 (ours 2 x 34 MB)
    assert input_sets(2 * 8 * 131072 * 128 * 2) == 3


def test_an_ncu_log_of_any_metrics_reads_a_row_a_kernel(tmp_path):
    f = tmp_path / "sm.csv"
    f.write_text(
        "==PROF== Connected\n"
        '"ID","Kernel Name","gpu__time_duration.sum","sm__cycles_active.max"\n'
        '"","","us","cycle"\n'
        '"0","custom_kernel_tq_mma_decode_split_float16_99","45.2","97,000"\n'
        '"1","cudnn_generated_fort_native_sdpa_sm80_flash_fprop(int)","46.9","88,000"\n'
    )
    head, rows = sp.metrics_rows(f)
    assert head == ["kernel", "gpu__time_duration.sum (us)", "sm__cycles_active.max (cycle)"]
    assert rows == [["custom_kernel_tq_mma_decode_split_float16", "45.2", "97,000"],
                    ["cudnn_generated_fort_native_sdpa_sm80_flash_fprop", "46.9", "88,000"]]  # fmt: skip


def test_traced_layers_read_back_from_their_workspaces(monkeypatch):
    """--trace on CUDA: each layer's workspace past kernel_trace.TRACE_AT holds its last
    launch's block timelines; the spans come back a layer, and the median layer's summary."""
    import mlx.core as mx
    import numpy as np

    from bench.kernel_trace import SLOTS, TRACE_AT
    from services.turboquant import cache as tq_cache

    def record(span_ns: int) -> np.ndarray:
        raw = np.zeros(2 * SLOTS, dtype=np.uint64)  # two split blocks on two SMs
        for b in range(2):
            r = raw[b * SLOTS : (b + 1) * SLOTS]
            marks = {0: 1000, 2: 4000, 3: 4500, 4: 20000, 5: 20100, 6: 20200, 7: 20300,
                     8: 21000, 10: 22000, 11: 1000 + span_ns - 100 * (1 - b)}  # fmt: skip
            for i, t in marks.items():
                r[i], r[16 + i] = 10**9 + t, 5 * 10**6 + 2 * t
            r[1] = (b << 32) | (b << 16)
        return raw

    class Work:
        def __init__(self, span_ns):
            trace = np.zeros(2 * (2 * SLOTS), dtype=np.float32)
            trace.view(np.uint64)[:] = record(span_ns)
            head = np.zeros(tq_cache.JOIN_COUNTER_ROWS + TRACE_AT, dtype=np.float32)
            self.array = mx.array(np.concatenate([head, trace]))
            self.floats = TRACE_AT + trace.size

    class Layer:
        head_k = None

    layers = [Layer(), Layer(), Layer()]
    works = {id(layers[0]): Work(27000), id(layers[1]): Work(45000), id(layers[2]): Work(30000)}
    monkeypatch.setattr(tq_cache, "join_workspace", lambda c: works[id(c)])
    traced = sp.layer_traces(layers, mhz=2000.0)
    assert traced["spans_us"] == [27.0, 45.0, 30.0]
    assert traced["median_layer"][0].startswith("span   30.0 us, 2 split blocks")
