"""benchmarks/common.py: the bootstrap CI equals a plain resampling loop (and the vectorised draw
the scripts used before, so committed CIs do not move), the resumable run scaffold resumes and
merges shards, data and peers are found or refused clearly, provenance and memory readings."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from benchmark_scripts import script
from kvmem.runs import RunLog

common = script("common")


# --- bootstrap --------------------------------------------------------------------------------------

def plain_percentile_ci(statistic, x, y, n, seed):
    """The textbook loop: n resamples of the (x, y) pairs, the statistic on each, NaNs left out,
    the 2.5 and 97.5 percentiles."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(x), len(x))
        v = statistic(x[idx], y[idx])
        if not math.isnan(v):
            values.append(v)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)), len(values) / n


def correlation(x, y):
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def test_bootstrap_ci_equals_a_plain_loop():
    gen = np.random.default_rng(7)
    x = gen.normal(size=40)
    y = x + gen.normal(size=40)
    ci = common.bootstrap_ci(correlation, x, y, n=500, seed=3)
    assert (ci.lo, ci.hi, ci.defined) == plain_percentile_ci(correlation, x, y, 500, 3)
    assert ci.lo < correlation(x, y) < ci.hi
    # paired: resampling x and y with the same rows keeps the correlation; independent rows would not
    assert ci.lo > 0.3


def test_bootstrap_leaves_out_undefined_resamples():
    # an outcome that is nearly constant: many resamples hold only the common value
    x = np.arange(12, dtype=float)
    y = np.zeros(12)
    y[3] = 1.0
    ci = common.bootstrap_ci(correlation, x, y, n=400, seed=0)
    assert 0.4 < ci.defined < 0.9
    assert (ci.lo, ci.hi, ci.defined) == plain_percentile_ci(correlation, x, y, 400, 0)
    never = common.bootstrap_ci(correlation, x, np.zeros(12), n=50, seed=0)
    assert math.isnan(never.lo) and math.isnan(never.hi) and never.defined == 0.0


def test_bootstrap_shared_stream_equals_the_vectorised_draw():
    """bench_diagnose's paired differences drew one (n, m) index matrix per outcome from one
    generator; the per-resample draws of bootstrap_ci, from the same generator in turn, are the
    same indices, so its committed CIs are unchanged."""
    gen = np.random.default_rng(1)
    outcomes = [gen.normal(size=m) for m in (5, 37, 2)]
    rng_old, rng_new = np.random.default_rng(0), np.random.default_rng(0)
    for d in outcomes:
        boots = d[rng_old.integers(0, len(d), size=(300, len(d)))].mean(1)
        old = np.quantile(boots, [0.025, 0.975])
        new = common.bootstrap_ci(np.mean, d, n=300, rng=rng_new)
        assert (new.lo, new.hi) == (float(old[0]), float(old[1]))


def test_bootstrap_level_and_bad_samples():
    x = np.random.default_rng(2).normal(size=30)
    wide, narrow = (common.bootstrap_ci(np.mean, x, n=300, seed=0, level=level) for level in (0.95, 0.5))
    assert wide.lo < narrow.lo < narrow.hi < wide.hi
    values = common.bootstrap_values(np.mean, x, n=300, rng=np.random.default_rng(0))
    assert (narrow.lo, narrow.hi) == tuple(float(v) for v in np.percentile(values, [25, 75]))
    with pytest.raises(ValueError, match="length"):
        common.bootstrap_ci(correlation, x, x[:-1], n=10)


def test_committed_diagnose_cis_are_reproduced():
    """CIs of the committed factworld diagnose run, recomputed from its per-fact log by the
    script's own functions (on common.bootstrap_ci), are the committed ones, bit for bit: the
    paired differences (one generator across outcomes) and the score's Spearman CIs at the
    diagnosed layer."""
    import pandas as pd

    bench = script("bench_diagnose")
    folder = common.results_dir("diagnose")
    lines = (folder / "diagnose_factworld.jsonl").read_text().splitlines()
    committed = json.loads((folder / "diagnose_factworld.json").read_text())["results"]
    df = pd.DataFrame([json.loads(line)["record"] for line in lines[1:]])
    ok = df[(~df["unknown"]) & df["diagnosed_ES"].notna()]
    assert bench.paired_differences(ok, 2000, 0) == committed["paired"]
    checked = 0
    for c in committed["spearman"]:
        if c["predictor"] == "score" and c["condition"] == "diagnosed" and c["rho"] == c["rho"]:
            y = ok[f"diagnosed_{c['outcome']}"].astype(float).to_numpy()
            assert bench.spearman_ci(ok["score"].to_numpy(float), y, 2000, 0) == (c["ci_lo"], c["ci_hi"],
                                                                                   c["boot_defined"])
            checked += 1
    assert checked >= 5


# --- resumable runs -----------------------------------------------------------------------------------

def run_args(*argv):
    ap = argparse.ArgumentParser()
    common.add_run_arguments(ap, "items")
    args = ap.parse_args(list(argv))
    common.check_run_arguments(ap, args)
    return args


def compute(plan, items, settings, restart=False):
    """A script's loop: log each item this invocation works on, unless the log has it."""
    log = RunLog(plan.write_log, settings, restart=restart)
    done_now = []
    for item in plan.select(items, str):
        if str(item) not in log:
            log.add(str(item), {"square": item * item})
            done_now.append(item)
    return done_now, log.records()


def test_a_rerun_resumes_from_the_log(tmp_path):
    items, settings = list(range(6)), {"k": 1}
    log = tmp_path / "run.jsonl"
    plan = common.RunPlan.from_args(run_args(), log)
    assert plan.shard is None and not plan.summarising and plan.write_log == log
    RunLog(log, settings).add("0", {"square": 0})  # an earlier invocation stopped after one item
    done_now, records = compute(plan, items, settings)
    assert done_now == [1, 2, 3, 4, 5] and list(records) == [str(i) for i in items]
    assert compute(plan, items, settings)[0] == []  # nothing left
    assert compute(plan, items, settings, restart=True)[0] == items  # --restart starts over


def test_shards_merged_equal_one_run(tmp_path):
    items, settings = list(range(7)), {"k": 2}
    _, one = compute(common.RunPlan.from_args(run_args(), tmp_path / "one.jsonl"), items, settings)
    log = tmp_path / "sh.jsonl"
    RunLog(log, settings).add("3", {"square": 9})  # the run's own log already holds an item
    shards = []
    for i in range(3):
        plan = common.RunPlan.from_args(run_args("--shard", f"{i}/3"), log)
        assert plan.write_log.name == f"sh.shard{i}of3.jsonl"
        shards.append(compute(plan, items, settings)[0])
    assert sorted(sum(shards, [])) == [0, 1, 2, 4, 5, 6]  # every item once, the logged one skipped
    assert shards[0] == [0, 6] and shards[1] == [1, 4]
    merge = common.RunPlan.from_args(run_args("--merge", "3"), log)
    assert merge.summarising and merge.merge_shards("items") == 7
    assert merge.logged() == set(one)
    assert merge.select(items + [99], str) == items  # summarising: what the log holds, nothing new
    assert RunLog(log, settings).records() == one


def test_run_flags_that_would_lose_or_mix_work_are_refused(capsys):
    for argv in (["--shard", "0/2", "--merge", "2"], ["--shard", "1/2", "--logged-only"],
                 ["--restart", "--merge", "2"], ["--restart", "--logged-only"], ["--shard", "2/2"],
                 ["--shard", "half"], ["--merge", "0"]):
        with pytest.raises(SystemExit):
            run_args(*argv)
    assert "I/N" in capsys.readouterr().err
    assert common.RunPlan.from_args(run_args("--logged-only"), "x.jsonl").summarising


# --- data, peers, provenance, memory -------------------------------------------------------------------

def test_data_files_come_from_the_flag_the_environment_or_beside_the_repository(tmp_path, monkeypatch):
    ap = argparse.ArgumentParser()
    common.add_data_arguments(ap, "known", "corpus")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "wiki_vital_en.txt").write_text("text\n")
    monkeypatch.delenv(common.DATA_ENV, raising=False)
    assert common.data_dir() == common.ROOT.parent / "shared" / "data"
    # the environment rule is the library's (kvmem.datafiles), not a copy
    from kvmem import datafiles
    assert common.DATA_ENV == datafiles.DATA_ENV and common.data_folder is datafiles.data_folder
    monkeypatch.setenv(common.DATA_ENV, "")
    assert common.data_dir() == common.SHARED_DATA
    args = ap.parse_args(["--data", str(tmp_path)])
    assert common.data_file(args, "corpus") == str(tmp_path / "corpus" / "wiki_vital_en.txt")
    monkeypatch.setenv(common.DATA_ENV, str(tmp_path))
    assert common.data_file(ap.parse_args([]), "corpus") == str(tmp_path / "corpus" / "wiki_vital_en.txt")
    with pytest.raises(common.MissingDataError, match="KVMEM_DATA") as e:
        common.data_file(ap.parse_args([]), "known")
    assert str(tmp_path / "known_1000.json") in str(e.value)
    assert common.data_file(ap.parse_args([]), "known", required=False) is None
    with pytest.raises(common.MissingDataError, match="--known"):
        common.data_file(ap.parse_args(["--known", str(tmp_path / "nope.json")]), "known")
    assert common.data_name(ap.parse_args([]), "known") == "known_1000.json"  # what run logs record


def test_peers_are_found_in_the_folder_setup_made_or_refused(tmp_path, monkeypatch):
    ap = argparse.ArgumentParser()
    common.add_peer_arguments(ap)
    monkeypatch.delenv(common.PEERS_ENV, raising=False)
    with pytest.raises(common.MissingPeerError, match="setup.sh"):
        common.peer_python(ap.parse_args([]), "causal-tracer")
    with pytest.raises(common.MissingPeerError, match="not set up"):
        common.peer_python(ap.parse_args(["--peers", str(tmp_path)]), "causal-tracer")
    python = tmp_path / "ct-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert common.peer_python(ap.parse_args(["--peers", str(tmp_path)]), "causal-tracer") == str(python)
    monkeypatch.setenv(common.PEERS_ENV, str(tmp_path))
    assert common.peer_python(ap.parse_args([]), "causal-tracer") == str(python)
    with pytest.raises(common.MissingPeerError, match="not set up"):
        common.peer_python(ap.parse_args([]), "knowledge-neurons")
    assert common.peer_python(ap.parse_args(["--peer-python", str(python)]), "knowledge-neurons") == str(python)


def test_provenance_table_memory_and_references():
    p = common.provenance("bench_x.py", ["--n", "2"])
    assert p["command"] == "python benchmarks/bench_x.py --n 2"
    assert p["commit"] == "unknown" or len(p["commit"].split("+")[0]) >= 7
    assert "cores" in p["machine"] and p["date"].endswith("UTC")
    assert common.provenance_line(p).startswith("Measured by `python benchmarks/bench_x.py --n 2` (")
    assert common.table(["a", "b"], [[1, "x"]], align="lr") == "| a | b |\n|---|---:|\n| 1 | x |"
    if os.path.exists("/proc/self/status"):
        assert common.peak_rss_mb() >= common.rss_mb() > 0
    reference = common.reference()
    assert Path(reference.__file__).resolve() == common.TESTS / "reference.py"
    assert callable(reference.naive_trace) and callable(reference.per_layer_ig)
