"""benchmarks/interference_validation.py: its statistics against plain definitions (AUC as the share
of positive-negative pairs ranked right, Youden's threshold by trying every cut, the false-safe rate
by counting), and the summary of a small hand-made log (the shipped-threshold table included)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from benchmark_scripts import script


def _pair_auc(score, label):
    pos = [s for s, y in zip(score, label) if y]
    neg = [s for s, y in zip(score, label) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_threshold_and_false_safe_match_plain_definitions():
    iv = script("interference_validation")
    rng = np.random.default_rng(0)
    for _ in range(20):
        label = rng.random(30) < 0.4
        score = np.round(rng.random(30) + 0.5 * label, 1)  # ties on purpose
        assert iv.auc(score, label) == pytest.approx(_pair_auc(score, label))
        tau = iv.choose_threshold(score, label)
        j = lambda t: (score > t)[label].mean() - (score > t)[~label].mean()
        assert j(tau) == pytest.approx(max(j(t) for t in [-np.inf, *score]))
        safe = score <= tau
        if safe.any():
            assert iv.false_safe(score, label, tau) == pytest.approx(label[safe].sum() / safe.sum())
    assert np.isnan(iv.auc([0.1, 0.2], [True, True]))


def _row(risk, ns_drop):
    return {"risk": risk, "ns_pred_mean": -risk, "ns_lam_max": risk, "ns_drop": ns_drop, "ns_exact_drop": ns_drop,
            "NS": 1.0 - ns_drop, "prompts": [["neighbourhood", 1.0, -risk, -risk]] * 3}


def test_analyse_reports_the_shipped_threshold_over_all_records():
    iv = script("interference_validation")
    # 6 records: risk > 0 on three, of which two drop NS; of the three at risk 0 one drops NS
    risks, drops = [0.0, 0.0, 0.0, 0.2, 0.5, 0.1], [0.0, 0.1, 0.0, 0.2, 0.3, 0.0]
    records = [{"case_id": i, "conditions": {"preset C": _row(r, d)}} for i, (r, d) in enumerate(zip(risks, drops))]
    res = iv.analyse(records, n_boot=50)["preset C"]
    assert res["n"] == 6 and res["base_unsafe"] == pytest.approx(0.5)
    shipped = res["shipped"]
    assert shipped["tau"] == iv.RISK_THRESHOLD == 0.0
    assert shipped["false_safe"] == pytest.approx(1 / 3) and shipped["passing"] == pytest.approx(0.5)
    assert shipped["recall"] == pytest.approx(2 / 3)
    assert shipped["rule_auc"] == pytest.approx((2 / 3 + 2 / 3) / 2)  # flags 2 of 3 damaging, passes 2 of 3 harmless
    assert res["risk"]["auc"] == pytest.approx(_pair_auc(risks, [d > 0 for d in drops]))
    md = iv.markdown({"model": "m", "source": "s", "command": "x", "date": "d", "machine": "m", "commit": "c"}, {"preset C": res}, 6)
    assert "| preset C | 6 | 0.50 | 0.33" in md


def test_summary_compares_each_run_with_the_reference(tmp_path):
    iv, summary = script("interference_validation"), script("interference_summary")
    risks, drops = [0.0, 0.0, 0.0, 0.2, 0.5, 0.1], [0.0, 0.1, 0.0, 0.2, 0.3, 0.0]
    for model, flip in (("gemma-3-270m", False), ("other", True)):
        rs = [{"case_id": i, "conditions": {"preset C": _row(r, d if not flip else 0.3 - d)}}
              for i, (r, d) in enumerate(zip(risks, drops))]
        res = iv.analyse(rs, n_boot=20)
        (tmp_path / f"interference_{model}_counterfact.json").write_text(
            json.dumps({"model": model, "source": "counterfact", "results": res}))
    table = {r["model"]: r for r in summary.rows(tmp_path)}
    ref, other = table["gemma-3-270m"], table["other"]
    assert ref["rule_auc_minus_reference"] == 0.0
    assert other["rule_auc_minus_reference"] == pytest.approx(other["rule_auc"] - ref["rule_auc"])
    assert other["rule_auc"] != ref["rule_auc"]
