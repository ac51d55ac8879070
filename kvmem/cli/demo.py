"""`kvmem demo`: one fact, four views (`kvmem.pipelines.four_views`), written as an offline HTML
report (`kvmem.viz.report.fact_report`) and a summary.json."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from kvmem.errors import InvalidArgumentError

from kvmem.cli import common, options


def _fact_and_prompts(args: argparse.Namespace):
    """(fact, paraphrases, neighbours, knowledge-neuron prompts or None) of the demo's options."""
    if options.names_factworld(args.model) and not args.prompt:
        record = options.factworld_record(args.fact_index)
        fact = record.request if args.new is None else replace(record.request, target_new=args.new)
        from kvmem.factworld import shipped_world

        # Dai et al. share neurons across a fact's paraphrases: every template the world has.
        world = shipped_world()
        wfact = world.facts("train")[args.fact_index]
        neuron_prompts = [p.prompt for split in ("train", "paraphrase") for p in world.prompts_for(wfact, split)]
        return fact, record.paraphrase_prompts, record.neighborhood_prompts, neuron_prompts
    fact = options.single_fact(args)
    if fact.target_true is None:
        raise InvalidArgumentError("The demo needs the true answer: pass --target.")
    if fact.target_new is None:
        raise InvalidArgumentError("The demo's ROME edit needs a new object: pass --new.")
    return fact, tuple(args.paraphrase or ()), tuple(args.neighbour or ()), None


def cmd_demo(args: argparse.Namespace) -> int:
    common.no_display()
    from kvmem.pipelines.four_views import four_views
    from kvmem.pipelines.rome_settings import rome_settings
    from kvmem.viz.report import fact_report

    t0 = time.perf_counter()
    out = common.check_out(args.out)
    corpus, corpus_name = options.corpus(args, "kvmem demo")  # a missing --corpus fails before the model loads
    fact, paraphrases, neighbours, neuron_prompts = _fact_and_prompts(args)
    model = common.load_model(args.model, args.quiet, args.device)
    t_load = time.perf_counter() - t0
    hp = rome_settings(model, layer=args.layer, facts=[fact], progress=not args.quiet)
    # four_views computes ROME's statistics over the corpus (cached under --cache-dir) and times them
    report = four_views(model, fact, paraphrases=paraphrases, neighbours=neighbours, neuron_prompts=neuron_prompts,
                        corpus=corpus, n_tokens=args.n_tokens, cache_dir=args.cache_dir, hparams=hp,
                        window=args.window, samples=args.samples, steps=args.steps, seed=args.seed,
                        build_prompts=not options.names_factworld(args.model), progress=not args.quiet)
    report = replace(report, timings={"load model": t_load, **report.timings})

    page = fact_report(report, title=f"kvmem: one fact, four views ({args.model})",
                       meta={"model": args.model, "ROME statistics": f"{report.stats_tokens} tokens of {corpus_name}"})
    page.save(out / "report.html")
    summary = {"model": args.model, **report.summary()}
    summary["seconds"] = {k: round(v, 2) for k, v in report.timings.items()}
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    common.write_json(out / "summary.json", summary)
    common.say(args, f"fact: {fact.prompt!r} -> {fact.target_true!r} (model: {args.model})")
    for what, how in report.prompts_built.items():
        flag = "--paraphrase" if what == "paraphrases" else "--neighbour"
        common.say(args, f"{what}: {how} ({flag} gives your own)")
    for line in report.lines():
        common.say(args, line)
    common.say(args, f"wrote {out / 'report.html'} (opens offline) and {out / 'summary.json'} "
                     f"in {summary['seconds']['total']:.1f} s")
    return 0
