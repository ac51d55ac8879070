"""`kvmem neurons`: knowledge neurons of each fact of `--facts`, and what suppressing or
amplifying them does (`kvmem.pipelines.neuron_survey`)."""

from __future__ import annotations

import argparse
from functools import partial

from kvmem.pipelines import neuron_survey

from kvmem.cli import batch, common


def cmd_neurons(args: argparse.Namespace) -> int:
    out, model, records, skipped = batch.start(args)
    settings = {"analysis": "knowledge_neurons", "model": common.fingerprint(model), "threshold": args.threshold,
                "share": args.share, "steps": args.steps, "layers": args.layers, "controls": args.controls,
                "seed": args.seed}
    # Looked up at call time (not bound at import), so a test can interrupt the run inside it.
    compute = partial(_fact_neurons, args)
    log = batch.run_and_log(args, model, records, out, "neurons", settings, compute)
    rows = batch.logged_rows(log, records)
    survey = neuron_survey.NeuronSurvey(tuple(r for r in rows if "error" not in r), model.cfg.n_layers)
    table = survey.to_frame()
    files = common.write_table(out, "neurons", table) + common.write_table(out, "neuron_list", survey.neuron_frame())
    common.write_json(out / "neurons.json", rows)
    common.write_figure(out / "neurons.png", survey.plot())
    summary = {"command": "neurons", "model": args.model, "facts_file": str(args.facts), "n_facts": len(rows),
               "skipped_records": skipped, "failed": batch.failures(log, records),
               "mean_neurons": float(table["n_neurons"].mean()) if len(table) else None}
    common.write_json(out / "summary.json", summary)
    common.say(args, f"{len(rows)} facts: {survey.mean_neurons:.1f} knowledge neurons on average; "
                     f"suppressing them changes p(target) by {survey.mean_effect('suppress'):+.0%} "
                     f"(random: {survey.mean_effect('suppress', control=True):+.0%})")
    common.say(args, f"wrote {out}/: neurons.json, neurons.png, {', '.join(files)}, summary.json")
    return 0


def _fact_neurons(args: argparse.Namespace, model, record) -> dict:
    return neuron_survey.fact_neurons(model, record, threshold=args.threshold, share=args.share, layers=args.layers,
                                      steps=args.steps, controls=args.controls, seed=args.seed)
