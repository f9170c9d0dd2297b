"""bench/ab_report.py: an interleaved A/B of a kernel setting from split_sweep output and
ncu source pages, rendered as a docs section (no GPU: the inputs are written here)."""

from __future__ import annotations

import gzip
import json

from bench import ab_report

# ncu's source page: a title row, then one row an instruction (numbers may carry commas)
SOURCE = """"Kernel Name","k"
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_no_inst","stall_selected"
"0x7f0000000000","      LDC R1, c[0x0][0x28]","6","672","1","2"
"0x7f0000000010","      HMMA.16816.F32 R4, R8, R12, R4","1,200","4,096","700","300"
"0x7f0000000020","      EXIT","3","672","n/a","1"
"""


def sweep(times: dict[int, float], rule_splits: int = 16) -> list[dict]:
    rows = []
    for n, us in times.items():
        rows.append(
            dict(context=n, warps=4, linear=False, splits=rule_splits, rule=True, us=us + 9)
        )
        rows.append(dict(context=n, warps=4, linear=True, splits=rule_splits, rule=True, us=us))
        rows.append(dict(context=n, warps=4, linear=True, splits=8, rule=False, us=us - 5))
    return rows


def test_rule_times_take_the_rules_split_count_on_the_1d_grid():
    assert ab_report.rule_times(sweep({4033: 16.0, 32705: 28.0})) == {4033: 16.0, 32705: 28.0}


def test_source_counts_sum_every_instruction():
    c = ab_report.source_counts(SOURCE)
    assert c[ab_report.TOTAL] == 1209 and c[ab_report.EXECUTED] == 5440
    assert c["stall_no_inst"] == 701 and c["stall_selected"] == 303
    assert c["stall_wait"] == 0  # a column the page lacks


def test_the_section_pairs_rounds_and_takes_medians(tmp_path, monkeypatch):
    written = {}
    monkeypatch.setattr("bench.report.write_section",
                        lambda name, title, body, **kw: written.update(name=name, title=title, body=body))  # fmt: skip
    dirs = []
    for i, (a, b) in enumerate([(28.0, 24.0), (30.0, 27.0), (33.0, 26.0)]):
        for tag, us in (("default", a), ("tuned", b)):
            d = tmp_path / f"ab-{i}-{tag}"
            d.mkdir()
            (d / "split_sweep.json").write_text(json.dumps(sweep({32705: us})))
            dirs.append(str(d))
    csvs = []
    for tag, text in (("base", SOURCE), ("tuned", SOURCE.replace('"700"', '"70"'))):
        p = tmp_path / f"src_{tag}.csv.gz"
        p.write_bytes(gzip.compress(text.encode()))
        csvs.append(str(p))
    monkeypatch.setattr("sys.argv", ["ab_report.py", "--name", "looped", "--sweeps", ",".join(dirs),
                                     "--ncu", ",".join(csvs), "--write"])  # fmt: skip
    ab_report.main()
    assert (written["name"], written["title"]) == ("kernel_ab", "Split kernel A/B: looped")
    text = written["body"]
    assert "| 32705 | 28.0 / 24.0 | 30.0 / 27.0 | 33.0 / 26.0 | 30.0 | 26.0 | 1.15x |" in text
    assert "| no_inst | 701 | 71 |" in text
    # --section: a second A/B in a section of its own
    monkeypatch.setattr("sys.argv", ["ab_report.py", "--name", "lean", "--sweeps", ",".join(dirs),
                                     "--write", "--section", "kernel_ab_lean"])  # fmt: skip
    ab_report.main()
    assert written["name"] == "kernel_ab_lean" and "| no_inst |" not in written["body"]
