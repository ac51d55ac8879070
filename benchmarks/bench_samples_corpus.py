"""What does the demo's default corpus cost? ROME on CounterFact with C from the model's own
samples (`kvmem.editing.samples.model_samples`, what `kvmem demo` uses on a real model without
--corpus) against C from the Wikipedia summaries (ROME's kind of text), same records, same layer,
each C over the demo's default token count (`stats_tokens(model, corpus)`: 40 × d_mlp of
Wikipedia, 10 × d_mlp of samples, which cost a decoding step per token).

    nice -n 10 python benchmarks/bench_samples_corpus.py --model gemma-3-270m --n-records 50 --threads 1

Per record, both edits are evaluated in turn (each with its own C) and logged to
<out>_<model>_{wiki,samples}.jsonl (kvmem.runs.RunLog): rerunning the same command resumes;
--logged-only summarises what the logs hold (the records both logs have). Writes <out>.json and
<out>.md: ES/PS/NS per C, the paired NS and PS differences (samples − wiki) with bootstrap CIs,
and the seconds each C took (sampling included). Data: the CounterFact file and the corpus from the
data folder (--data, $KVMEM_DATA).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (add_data_arguments, data_file, data_name, provenance, provenance_line,
                    mean_difference, results_dir, table)

CONDITIONS = ("wiki", "samples")
METRICS = ("ES", "PS", "NS")


def statistics(model, layer: int, corpus_file: str, n_tokens: dict, seed: int) -> dict:
    """{condition: (SecondMoment, seconds to get it, of which sampling)}."""
    from kvmem.editing import second_moment
    from kvmem.editing.samples import model_samples

    out = {}
    t = time.perf_counter()
    out["wiki"] = [second_moment(model, layer, corpus_file, n_tokens=n_tokens["wiki"]), time.perf_counter() - t, 0.0]
    t = time.perf_counter()
    docs = model_samples(model, n_tokens["samples"], seed=seed)
    t_sample = time.perf_counter() - t
    out["samples"] = [second_moment(model, layer, docs, n_tokens=n_tokens["samples"]), time.perf_counter() - t,
                      t_sample]
    return out


def summarise(frames: dict, n_boot: int = 2000) -> dict:
    rome = {c: f[f.condition == "ROME"].set_index("case_id") for c, f in frames.items()}
    unedited = frames["wiki"][frames["wiki"].condition == "unedited"].set_index("case_id")
    ok = sorted(set(rome["wiki"].index[rome["wiki"].error.isna()]) & set(rome["samples"].index[rome["samples"].error.isna()]))
    res = {"n": len(ok), "n_refused": {c: int(r.error.notna().sum()) for c, r in rome.items()}, "metrics": {}}
    for m in METRICS:
        row = {c: float(rome[c].loc[ok, m].mean() * 100) for c in CONDITIONS}
        row["unedited"] = float(unedited.loc[ok, m].mean() * 100)
        diff = mean_difference(rome["samples"].loc[ok, m].to_numpy(dtype=float) * 100,
                               rome["wiki"].loc[ok, m].to_numpy(dtype=float) * 100, n_boot=n_boot)
        row["diff"] = diff["diff"]
        row["diff_ci"] = diff["ci"] if diff["n"] > 1 else None
        res["metrics"][m] = row
    return res


def markdown(res: dict, prov: dict) -> str:
    rows = []
    for m, r in res["metrics"].items():
        ci = f"[{r['diff_ci'][0]:+.1f}, {r['diff_ci'][1]:+.1f}]" if r["diff_ci"] else "n/a"
        rows.append([m, f"{r['unedited']:.1f}", f"{r['wiki']:.1f}", f"{r['samples']:.1f}", f"{r['diff']:+.1f}", ci])
    st = res["stats"]
    lines = [
        "# ROME's C from the model's own samples vs. Wikipedia (the demo's default corpus)", "",
        provenance_line(prov), "",
        f"{res['model']}, edit layer {res['layer']}, C over {res['n_tokens']['wiki']} tokens of Wikipedia and "
        f"{res['n_tokens']['samples']} of samples (the demo's defaults); "
        f"{res['n']} CounterFact records ({res['records']}) with both edits accepted "
        f"(refused: {res['n_refused']}). Metrics ×100; the difference is paired per record "
        "(samples − wiki), with a 95% bootstrap CI.", "",
        table(["metric", "unedited", "C: wiki", "C: samples", "samples − wiki", "95% CI"], rows), "",
        f"- C from Wikipedia: {st['wiki']['seconds']:.0f} s ({'cached' if st['wiki']['from_cache'] else 'computed'}), "
        f"condition number {st['wiki']['condition_number']:.3g}",
        f"- C from samples: {st['samples']['seconds']:.0f} s, of which sampling {st['samples']['sampling_s']:.0f} s "
        f"({'cached' if st['samples']['from_cache'] else 'computed'}), condition number "
        f"{st['samples']['condition_number']:.3g}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-records", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="the samples' seed (the demo's default)")
    ap.add_argument("--n-tokens", type=int, default=None,
                    help="tokens of both Cs (default: the demo's, stats_tokens(model, corpus), fewer for samples)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--logged-only", action="store_true", help="summarise the logged records, compute no more")
    ap.add_argument("--restart", action="store_true", help="discard the run logs and start over")
    ap.add_argument("--out", default=str(results_dir("editing") / "samples_corpus"))
    add_data_arguments(ap, "counterfact", "corpus")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import kvmem
    from kvmem.data import load_counterfact
    from kvmem.editing import rome_hparams
    from kvmem.editing.rome import edit_layer
    from kvmem.evaluation import evaluate_counterfact
    from kvmem.pipelines.rome_settings import stats_tokens
    from kvmem.runs import logged_keys

    model = kvmem.load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    hp = rome_hparams(model)
    layer = edit_layer(model, hp, None)
    from kvmem.pipelines.rome_settings import SAMPLES

    # each C as the demo makes it: stats_tokens(model, corpus) tokens (fewer for samples)
    n_tokens = {"wiki": args.n_tokens or stats_tokens(model), "samples": args.n_tokens or stats_tokens(model, SAMPLES)}
    records = load_counterfact(data_file(args, "counterfact"), limit=args.n_records)
    stats = statistics(model, layer, data_file(args, "corpus"), n_tokens, args.seed)
    logs = {c: Path(f"{args.out}_{args.model}_{c}.jsonl") for c in CONDITIONS}
    if args.logged_only:
        done = set.intersection(*(logged_keys(p) for p in logs.values()))
        records = [r for r in records if str(r.case_id) in done]
    frames = {c: [] for c in CONDITIONS}
    t0 = time.perf_counter()
    for i, rec in enumerate(records):
        for c in CONDITIONS:  # alternate, so a partial run holds paired records
            ev = evaluate_counterfact(model, [rec], stats=stats[c][0], hparams=hp, generation=False, progress=False,
                                      log=str(logs[c]), restart=args.restart and i == 0)
            frames[c].append(ev.frame)
        print(f"record {i + 1}/{len(records)} (case {rec.case_id}) done, {time.perf_counter() - t0:.0f} s", flush=True)
    import pandas as pd

    frames = {c: pd.concat(f, ignore_index=True) for c, f in frames.items()}
    res = summarise(frames)
    res.update(model=args.model, layer=layer, n_tokens=n_tokens, records=data_name(args, "counterfact"),
               stats={c: {"seconds": s[1], "sampling_s": s[2], "from_cache": s[0].from_cache,
                          "condition_number": s[0].condition_number, "n_tokens": s[0].n_tokens}
                      for c, s in stats.items()})
    prov = provenance(__file__, argv)
    res["provenance"] = prov
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=1))
    text = markdown(res, prov)
    Path(f"{args.out}.md").write_text(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
