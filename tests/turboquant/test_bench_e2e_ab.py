"""bench/e2e_ab.py and gpu_session.sh's e2e-ab step on any machine: two builds' processes
alternated, each process's ratio to fp16 read from its own file, medians per build."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

from bench import e2e_ab

REPO = Path(__file__).resolve().parents[2]


def _process(d: Path, fp16: float, ours: float, build_ms: float = 2.0) -> None:
    same = {
        "model": "llama-3.1-8b",
        "weight_bits": 16,
        "context": 32768,
        "batch": 1,
        "peak_bytes": 2**34,
        "unpipelined_ms": {"build": 1.5, "dispatch": 3.0, "wait": 3.0},
    }
    rows = [
        {**same, "cache": "fp16", "tok_s": fp16, "tok_s_runs": [fp16], "vs_first": 1.0,
         "kv_bytes": 2**32, "host_ms": {"build": 1.6, "dispatch": 4.7, "wait": 0.0}},
        {**same, "cache": "tq-default", "tok_s": ours, "tok_s_runs": [ours],
         "vs_first": ours / fp16 + 0.001, "kv_bytes": 2**30,
         "host_ms": {"build": build_ms, "dispatch": 2.9, "wait": 1.0}},
    ]  # fmt: skip
    d.mkdir(parents=True)
    (d / "e2e_decode_gpu.json").write_text(json.dumps({"mlx": "x", "gpu": "g", "rows": rows}))


def test_the_verdict_takes_each_process_ratio_and_medians_per_build(tmp_path):
    runs = {"new-1": (150, 168), "old-1": (150, 165), "old-2": (140, 150), "new-2": (140, 147),
            "new-3": (145, 160)}  # fmt: skip
    for name, (fp16, ours) in runs.items():
        _process(tmp_path / name, fp16, ours, build_ms=2.0 if name.startswith("new") else 3.0)
    (tmp_path / "order.txt").write_text("\n".join(runs) + "\nold-3\n")  # old-3: left nothing
    v = e2e_ab.verdict(tmp_path, goal=1.1)
    assert set(v) == {"new", "old"}
    # the paired ratio each process wrote (vs_first), in the order they ran
    assert v["new"]["ratios"] == [168 / 150 + 0.001, 147 / 140 + 0.001, 160 / 145 + 0.001]
    assert v["new"]["n"] == 3 and v["old"]["n"] == 2
    assert abs(v["new"]["median"] - (160 / 145 + 0.001)) < 1e-9
    assert abs(v["old"]["median"] - statistics.median([165 / 150, 150 / 140]) - 0.001) < 1e-9
    assert v["new"]["at_goal"] == 2 and v["old"]["at_goal"] == 1  # 1.101 counts, 1.072 not
    assert v["new"]["build_ms"] == 2.0 and v["old"]["build_ms"] == 3.0
    table = e2e_ab.summary(v)
    assert "| new | 3 |" in table and "| old | 2 |" in table


def test_session_22s_recorded_processes_give_the_medians_the_docs_quote(tmp_path):
    """The docs' e2e_raw2 medians (1.08x new over 16, 1.09x old over 18) from its files."""
    root = REPO / "bench" / "results" / "session22"
    order = (root / "processes.txt").read_text().split()
    names = [w[len("raw2-e2e-") :] for w in order if w.startswith("raw2-e2e-")]
    for n in names:
        shutil.copytree(root / f"raw2-e2e-{n}", tmp_path / n)
    (tmp_path / "order.txt").write_text("\n".join(names))
    v = e2e_ab.verdict(tmp_path)
    assert (v["new"]["n"], v["old"]["n"]) == (16, 18)
    assert f"{v['new']['median']:.2f}" == "1.08" and f"{v['old']['median']:.2f}" == "1.09"
    assert (v["new"]["at_goal"], v["old"]["at_goal"]) == (6, 7)
    # each process's ratio shown as the docs' note has it (rounded once, from the file)
    table = e2e_ab.summary(v)
    assert (
        "| old | 18 | 1.10 / 1.14 / 1.09 / 1.09 / 1.15 / 1.08 / 1.01 / 1.11 / 1.15 / 1.12 / "
        "1.10 / 1.07 / 1.09 / 1.04 / 1.09 / 1.14 / 1.07 / 1.09 |" in table
    )


STUB = """import argparse, json, os, pathlib
ap = argparse.ArgumentParser()
ap.add_argument("--out")
a, _ = ap.parse_known_args()
ours = float(pathlib.Path(__file__).with_name("RATE").read_text())
rows = [{"cache": "fp16", "tok_s": 100.0, "vs_first": 1.0,
         "host_ms": {"build": 1, "dispatch": 1, "wait": 0}},
        {"cache": "tq-default", "tok_s": ours, "vs_first": ours / 100,
         "host_ms": {"build": 1, "dispatch": 1, "wait": 0}}]
pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
pathlib.Path(a.out, "e2e_decode_gpu.json").write_text(json.dumps({"rows": rows}))
print(os.environ["PYTHONPATH"].split(":")[1])
"""


def test_the_e2e_ab_step_alternates_the_builds_each_from_its_own_tree(tmp_path):
    """gpu_session.sh e2e-ab 3 old: ABBA order, each process run inside its own tree (its
    bench and services on PYTHONPATH), the verdict printed at the end."""
    root = tmp_path / "repo"
    for tree, rate in ((root, "112"), (root / ".variants" / "old", "105")):
        (tree / "bench").mkdir(parents=True)
        (tree / "bench" / "e2e_decode_gpu.py").write_text(STUB)
        (tree / "bench" / "RATE").write_text(rate)
    for f in ("gpu_session.sh", "e2e_ab.py", "report.py", "__init__.py"):
        shutil.copy(REPO / "bench" / f, root / "bench" / f)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "bench/gpu_session.sh", "e2e-ab", "3", "old"], cwd=root,
                       env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = out / "e2e-ab"
    assert (d / "order.txt").read_text().split() == ["new-1", "old-1", "old-2", "new-2",
                                                     "new-3", "old-3"]  # fmt: skip
    # each build ran from its own tree
    assert (d / "new-1.log").read_text().strip() == str(root)
    assert (d / "old-2.log").read_text().strip() == str(root / ".variants" / "old")
    assert "| new | 3 | 1.12 / 1.12 / 1.12 | 1.120x | 3 |" in r.stdout
    assert "| old | 3 | 1.05 / 1.05 / 1.05 | 1.050x | 0 |" in r.stdout
    # pack: everything under $OUT as one tarball (the device tool brings back few files)
    r = subprocess.run(["bash", "bench/gpu_session.sh", "pack"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.iterdir()] == ["results.tgz"]
    with tarfile.open(out / "results.tgz") as t:
        assert "./e2e-ab/order.txt" in t.getnames()
        assert "./e2e-ab/old-3/e2e_decode_gpu.json" in t.getnames()


def test_write_renders_every_process_with_the_verdict_above(tmp_path, monkeypatch):
    """Two device calls' directories: their processes in the calls' order."""
    for call, runs in (("a", (("new-1", 112.0), ("old-1", 105.0))),
                       ("b", (("old-1", 104.0), ("new-1", 111.0)))):  # fmt: skip
        for name, ours in runs:
            _process(tmp_path / call / name, 100.0, ours)
        (tmp_path / call / "order.txt").write_text("\n".join(n for n, _ in runs))
    written = {}
    monkeypatch.setattr(
        "bench.report.write_section",
        lambda name, title, body, **kw: written.update(name=name, body=body, **kw),
    )
    argv = ["e2e_ab.py", str(tmp_path / "a"), str(tmp_path / "b"), "--write",
            "--section", "e2e_ab_t", "--machine", "m", "--command", "c", "--note", "Why."]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    e2e_ab.main()
    body = written["body"]
    assert written["name"] == "e2e_ab_t" and written["machine"] == "m"
    assert body.index("Why.") < body.index("| new | 2 |") < body.index("| model |")
    assert "Processes: 1 new, 2 old, 3 old, 4 new." in body
    rows = [ln.split("|") for ln in body.splitlines() if ln.startswith("| llama-3.1-8b |")]
    # every process's two rows, numbered in the order they ran, ratios as each file has them
    assert [(r[4].strip(), r[6].strip(), r[9].strip()) for r in rows] == [
        (str(i), cache, ratio)
        for i, ours in enumerate((1.121, 1.051, 1.041, 1.111), 1)
        for cache, ratio in (("fp16", "1.00x"), ("tq-default", f"{ours:.2f}x"))
    ]


TUNE_STUB = """import argparse, json, pathlib
ap = argparse.ArgumentParser()
ap.add_argument("--out")
ap.add_argument("--tune", default="")
a, _ = ap.parse_known_args()
ours = 104.0 if a.tune == "SHORT_BODY=0" else 109.0
rows = [{"cache": "fp16", "tok_s": 100.0, "vs_first": 1.0},
        {"cache": "tq-default", "tok_s": ours, "vs_first": ours / 100}]
pathlib.Path(a.out).mkdir(parents=True, exist_ok=True)
pathlib.Path(a.out, "e2e_decode_gpu.json").write_text(json.dumps({"rows": rows}))
"""


def test_the_e2e_tune_ab_step_alternates_settings_and_prints_each_processs_ratio(tmp_path):
    """gpu_session.sh e2e-tune-ab 32768 2 "SHORT_BODY=0" "": ABBA processes, the first with
    --tune, the other with none; each line its process's tok/s and paired ratio."""
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "e2e_decode_gpu.py").write_text(TUNE_STUB)
    shutil.copy(REPO / "bench" / "gpu_session.sh", root / "bench" / "gpu_session.sh")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "bench/gpu_session.sh", "e2e-tune-ab", "32768", "2", "SHORT_BODY=0",
                        ""], cwd=root, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("== ")]
    assert [x.split()[1] for x in lines] == ["a-1", "b-1", "b-2", "a-2"]
    a1 = next(x for x in lines if x.startswith("== a-1"))
    b2 = next(x for x in lines if x.startswith("== b-2"))
    assert a1 == "== a-1 (SHORT_BODY=0): fp16 100.0 tok/s 1.000x tq-default 104.0 tok/s 1.040x"
    assert b2 == "== b-2 (): fp16 100.0 tok/s 1.000x tq-default 109.0 tok/s 1.090x"
    assert (out / "e2e-tune-ab-32768" / "a-2" / "e2e_decode_gpu.json").is_file()
