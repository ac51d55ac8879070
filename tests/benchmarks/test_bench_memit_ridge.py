"""benchmarks/memit_ridge.py: a saved one-layer MEMIT batch re-solved from its own keys and targets
equals the library's edit at that λ (and AlphaEdit's at that α) fitted from scratch, and the
script's table at the edit's own λ equals scoring the saved edit itself."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmark_scripts import script


def test_resolving_a_saved_batch_equals_the_library_edit(tmp_path, factworld):
    import kvmem
    from kvmem.editing import null_space, second_moment
    from kvmem.editing.memit import compute_memit_edit, memit_hparams
    from kvmem.evaluation import records_metrics
    from kvmem.factworld import corpus, counterfact_records, shipped_world

    ridge = script("memit_ridge")
    records = counterfact_records(shipped_world(), n=3)
    requests = [r.request for r in records]
    stats = second_moment(factworld, 1, corpus(), n_tokens=3000, progress=False)
    hp = dataclasses.replace(memit_hparams(factworld), layers=(1,))
    cache: dict = {}  # the same v* for every solve below
    edit = compute_memit_edit(factworld, requests, stats={1: stats}, hparams=hp, value_cache=cache)
    lam = hp.mom2_update_weight

    def close(a, b):
        return float((a - b).norm() / b.norm()) < 1e-8

    other = compute_memit_edit(factworld, requests, stats={1: stats}, value_cache=cache,
                               hparams=dataclasses.replace(hp, mom2_update_weight=lam / 4))
    assert close(ridge.resolved(edit, stats.C, lam=lam / 4).U[0], other.U[0].double())
    assert not close(other.U[0].double(), edit.U[0].double())
    ahp = dataclasses.replace(memit_hparams(factworld, null_space=True), layers=(1,), l2=1.0)
    alpha = compute_memit_edit(factworld, requests, stats={1: stats}, hparams=ahp, value_cache=cache)
    P = null_space(stats.C, threshold=ahp.nullspace_threshold).P
    assert close(ridge.resolved(edit, stats.C, alpha=1.0, P=P).U[0], alpha.U[0].double())
    assert torch.equal(alpha.V[0], edit.V[0])

    # batches of one: each request solved alone equals the library's edit of that request alone; the
    # weight its own residual gets at its own (prefix-averaged) key is Sherman-Morrison's s / (λ + s)
    parts = ridge.sub_batches(edit, stats.C, 1)
    assert [idx for idx, _ in parts] == [[0], [1], [2]]
    alone = compute_memit_edit(factworld, requests[1:2], stats={1: stats}, hparams=hp, value_cache=cache)
    assert close(parts[1][1].U[0], alone.U[0].double())
    # R = z − h from a float32 forward of the batch's (padded) rows vs the lone request's row
    v_alone = alone.V[0].double()
    assert float((parts[1][1].V[0] - v_alone).norm() / v_alone.norm()) < 1e-5
    K = edit.keys[0].double()
    s = torch.einsum("nd,de,ne->n", K, torch.linalg.inv(stats.C.double()), K)
    w = ridge.key_weights(parts, {i: (K[i : i + 1], [K[i : i + 1]]) for i in range(3)})
    assert w["own_E"] == pytest.approx(float((s / (lam + s)).median()), rel=1e-6)
    assert w["cross_P"] == 0.0  # nobody else in a batch of one

    edit.save(tmp_path / "batch" / "b.safetensors")
    out = tmp_path / "ridge"
    ridge.main(["--model", "factworld", "--edit", str(tmp_path / "batch"), "--lambdas", str(lam), str(lam / 4),
                "--alphaedit", "1", "--batch-sizes", "2", "--stats-tokens", "3000", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["resolve_check"] < 1e-6 and data["n_records"] == 3
    with kvmem.edited(factworld, edit):
        direct = records_metrics(factworld, records, generation=False)
    for m in ("ES", "PS", "NS"):
        assert data["rows"][0][m] == pytest.approx(sum(r[m] for r in direct) / 3, abs=1e-12)
    assert [r["method"] for r in data["rows"]] == ["memit", "memit", "alphaedit", "memit"]
    assert [r["batch_size"] for r in data["rows"]] == [3, 3, 3, 2]
    halves = [records[:2], records[2:]]  # batches of 2: each scored under its own solve
    scored = []
    for (idx, e), recs in zip(ridge.sub_batches(edit, stats.C, 2), halves):
        with kvmem.edited(factworld, e):
            scored += records_metrics(factworld, recs, generation=False)
    assert data["rows"][3]["PS"] == pytest.approx(sum(r["PS"] for r in scored) / 3, abs=1e-12)
    md = out.with_suffix(".md").read_text()
    assert "AlphaEdit α=1" in md and "batches of 2" in md

    with pytest.raises(SystemExit, match="C differs"):
        ridge.main(["--model", "factworld", "--edit", str(tmp_path / "batch"), "--stats-tokens", "2000",
                    "--out", str(tmp_path / "x")])
