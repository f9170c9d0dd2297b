"""bench/kernel_trace.py's reading of the blocks' records (the records come from the GPU)."""

from __future__ import annotations

import numpy as np

from bench import kernel_trace as kt


def _record(raw, block, sm, idx, row, marks):
    base = block * kt.SLOTS
    raw[base + 1] = (sm << 32) | (idx << 16) | row
    for i, (ns, cyc) in marks.items():
        raw[base + i], raw[base + 16 + i] = ns, cyc


def test_records_decode_into_stages_and_each_rows_last_block_is_its_join():
    raw = np.zeros(3 * kt.SLOTS, dtype=np.uint64)
    t0 = 10**9
    split = {0: (t0, 100), 2: (t0 + 1000, 2080), 3: (t0 + 1500, 3070)}
    split.update({4 + w: (t0 + 5000 + w, 10000 + w) for w in range(4)})
    split.update({8: (t0 + 6000, 12000), 10: (t0 + 6500, 13000), 11: (t0 + 6600, 13200)})
    _record(raw, 0, sm=3, idx=0, row=0, marks=split)
    late = {i: (ns + 2000, c) for i, (ns, c) in split.items()}
    late[11] = (t0 + 12000, 30000)  # counted last, then joined
    _record(raw, 1, sm=4, idx=1, row=0, marks=late)
    fp = {0: (t0 + 100, 50), 9: (t0 + 900, 1000), 10: (t0 + 950, 1100), 11: (t0 + 960, 1120)}
    _record(raw, 2, sm=3, idx=2, row=0, marks=fp)
    blocks = kt.decode(raw, 3)
    assert [(b["sm"], b["idx"], b["row"]) for b in blocks] == [(3, 0, 0), (4, 1, 0), (3, 2, 0)]
    assert blocks[0]["ns"][0] == 0 and blocks[1]["ns"][0] == 2000 and blocks[2]["ns"][0] == 100
    assert blocks[0]["cycles"][2] == 1980  # clock64 since the block's own start
    lines = kt.summary(blocks, mhz=1980.0)
    assert lines[0].startswith("span   12.0 us, 2 split blocks, 1 fp blocks, 2 SMs")
    text = "\n".join(lines)
    # the row's last block is the one that ended last: its join took (30000 - 13000) cycles
    join = next(x for x in lines if "last blocks: join" in x)
    assert f"max {17000 / 1980:6.1f}" in join
    assert "rotate (us, clock)" in text and "SM busy span" in text


def test_the_query_loads_and_the_joins_parts_are_read_where_the_build_marks_them():
    raw = np.zeros(2 * kt.SLOTS, dtype=np.uint64)
    t0 = 10**9
    split = {0: (t0, 0), 12: (t0 + 700, 1386), 2: (t0 + 1000, 1980), 3: (t0 + 1500, 2970)}
    split.update({4 + w: (t0 + 5000 + w, 9900 + w) for w in range(4)})
    split.update({8: (t0 + 6000, 11880), 10: (t0 + 6500, 12870)})
    split.update({13: (t0 + 6600, 13068), 14: (t0 + 8000, 15840), 11: (t0 + 9000, 17820)})
    _record(raw, 0, sm=1, idx=0, row=0, marks=split)
    old = {i: v for i, v in split.items() if i < 12}  # a build before these marks
    _record(raw, 1, sm=2, idx=0, row=1, marks=old)
    lines = kt.summary(kt.decode(raw, 2), mhz=1980.0)
    got = {x.split("(us")[0].strip(): x for x in lines}
    # only the marked block counts: 1386 cycles to its query, at 1980 MHz 0.7 us
    assert "max    0.7" in got["query loads"] and "p10    0.7" in got["query loads"]
    assert "max    0.1" in got["join: fence"]  # 13068 - 12870 cycles
    assert "max    1.4" in got["join: partials"]  # 15840 - 13068
    assert "max    1.0" in got["join: rotate, out"]  # 17820 - 15840


def test_a_trace_without_the_new_marks_has_no_rows_for_them():
    raw = np.zeros(kt.SLOTS, dtype=np.uint64)
    marks = {0: (10**9, 0), 2: (10**9 + 1000, 1980), 3: (10**9 + 1500, 2970)}
    marks.update({4 + w: (10**9 + 5000, 9900) for w in range(4)})
    marks.update({8: (10**9 + 6000, 11880), 10: (10**9 + 6500, 12870), 11: (10**9 + 7000, 13860)})
    _record(raw, 0, sm=1, idx=0, row=0, marks=marks)
    text = "\n".join(kt.summary(kt.decode(raw, 1), mhz=1980.0))
    assert "query loads" not in text and "join: fence" not in text and "last blocks: join" in text


def test_the_traffic_between_launches_is_what_each_mode_names():
    import mlx.core as mx
    import pytest

    assert kt.traffic("none") is None
    with pytest.raises(ValueError, match="--between"):
        kt.traffic("dram")
    sizes = dict(l2_mb=1, tlb_gb=1 / 64, stride_kb=64)  # 1 MB and 16 MB on the CPU
    got = {m: kt.traffic(m, **sizes)() for m in ("kernel", "l2", "tlb", "both")}
    assert [len(v) for v in got.values()] == [1, 2, 2, 3]
    mx.eval(*(a for v in got.values() for a in v))
    l2 = got["l2"][1]
    assert l2.size == 2**20 // 4 and float(l2.sum()) == l2.size  # a copy of every float
    strided = got["tlb"][1]
    assert strided.shape == () and float(strided) == 256  # one float a stride: 16 MB / 64 KB
    rows, step = kt.tlb_shape(16, 2048)  # the default: 16 GB in 2 MB strides, int32 dimensions
    assert (rows, step) == (8192, 2**19) and rows * step * 4 == 16 * 2**30
