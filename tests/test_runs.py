"""Splitting a resumable run into shards and merging their logs (kvmem.runs)."""

import json

import pytest
import torch

from kvmem.errors import InvalidArgumentError, RunLogError
from kvmem.runs import (
    RunLog,
    log_settings,
    logged_keys,
    merge_run_logs,
    parse_shard,
    shard_path,
    take_shard,
)


def test_parse_shard():
    assert parse_shard(None) is None
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/3", "1/0", "a/b", "3", "1/2/3"):
        with pytest.raises(InvalidArgumentError, match="I/N"):
            parse_shard(bad)


def test_shards_partition_the_items():
    items = list(range(11))
    shards = [take_shard(items, (i, 3)) for i in range(3)]
    assert sorted(x for s in shards for x in s) == items
    assert shards[1] == [1, 4, 7, 10]
    assert take_shard(items, None) == items


def test_shard_path(tmp_path):
    p = tmp_path / "aie_x.jsonl"
    assert shard_path(p, None) == p
    assert shard_path(p, (1, 4)).name == "aie_x.shard1of4.jsonl"


def _log(path, settings, items):
    log = RunLog(path, settings)
    for k, r in items.items():
        log.add(k, r)
    return path


def test_merge_run_logs(tmp_path):
    s = {"model": "m", "samples": 10}
    a = _log(tmp_path / "a.jsonl", s, {"f1": {"x": 1}, "f3": {"x": 3}})
    b = _log(tmp_path / "b.jsonl", s, {"f2": {"x": 2}, "f3": {"x": 3}})  # f3 in both, same record
    dest = tmp_path / "all.jsonl"
    assert merge_run_logs([a, b], dest) == 3
    assert log_settings(dest) == s
    assert RunLog(dest, s).records() == {"f1": {"x": 1}, "f3": {"x": 3}, "f2": {"x": 2}}
    # an existing destination keeps its items; merging again adds nothing twice
    c = _log(tmp_path / "c.jsonl", s, {"f4": {"x": 4}})
    assert merge_run_logs([a, b, c], dest) == 4
    lines = dest.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["settings"] == s


def test_merge_refuses_other_runs(tmp_path):
    s = {"model": "m", "samples": 10}
    a = _log(tmp_path / "a.jsonl", s, {"f1": {"x": 1}})
    other = _log(tmp_path / "o.jsonl", {**s, "samples": 3}, {"f2": {"x": 2}})
    with pytest.raises(RunLogError, match="samples"):
        merge_run_logs([a, other], tmp_path / "all.jsonl")
    assert not (tmp_path / "all.jsonl").exists()
    # an item computed twice (records differ in their timings): the first record is kept
    again = _log(tmp_path / "c.jsonl", s, {"f1": {"x": 1, "seconds": 9.0}, "f5": {"x": 5}})
    assert merge_run_logs([a, again], tmp_path / "all.jsonl") == 2
    assert RunLog(tmp_path / "all.jsonl", s).records()["f1"] == {"x": 1}
    assert logged_keys(tmp_path / "all.jsonl") == {"f1", "f5"} and logged_keys(tmp_path / "none.jsonl") == set()
    with pytest.raises(RunLogError, match="does not exist"):
        merge_run_logs([tmp_path / "missing.jsonl"], tmp_path / "all.jsonl")
    (tmp_path / "junk.jsonl").write_text("not a log\n")
    with pytest.raises(RunLogError, match="not a kvmem run log"):
        merge_run_logs([tmp_path / "junk.jsonl"], tmp_path / "all.jsonl")


def test_sharded_average_indirect_effect_equals_one_run(tiny_gpt2, tmp_path):
    """AIE traced in three shards, logs merged, then summarised from the log alone == one run."""
    from kvmem.core.facts import Fact
    from kvmem.tracing import average_indirect_effect
    from tests.test_tracing import _known_facts

    facts = _known_facts(tiny_gpt2)[:4] + [Fact("The Eiffel Tower is located in", "Eiffel Tower", "Paris")]
    kw = dict(window=2, samples=2, seed=1, noise=0.4, progress=False)
    full = average_indirect_effect(tiny_gpt2, facts, **kw)
    log = tmp_path / "aie.jsonl"
    for i in range(3):
        average_indirect_effect(tiny_gpt2, take_shard(facts, (i, 3)), log=str(shard_path(log, (i, 3))), **kw)
    merge_run_logs([shard_path(log, (i, 3)) for i in range(3)], log)
    calls = []
    from kvmem.tracing import average

    orig = average.trace_prepared
    average.trace_prepared = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        merged = average_indirect_effect(tiny_gpt2, facts, log=str(log), **kw)
    finally:
        average.trace_prepared = orig
    assert calls == []  # everything came from the merged log
    torch.testing.assert_close(merged.aie, full.aie, equal_nan=True)
    assert (merged.n_facts, merged.n_skipped) == (full.n_facts, full.n_skipped)
