"""Knowledge neurons: speed and agreement vs EleutherAI's `knowledge-neurons`, and Dai et al.'s
suppress / amplify experiment.

    python benchmarks/bench_neurons.py speed                 # factworld: kvmem vs per-layer loop vs peer
    python benchmarks/bench_neurons.py peer --n-facts 12     # agreement with knowledge-neurons==0.0.2
    python benchmarks/bench_neurons.py specificity           # factworld: own fact vs other facts
    python benchmarks/bench_neurons.py effects --model gemma-3-270m --facts-per-relation 8 --relations 10
    python benchmarks/bench_neurons.py speed --model gemma-3-270m --no-peer   # Gemma timing (no HF peer)

The peer runs in its own virtual environment (`benchmarks/peers/setup.sh DIR` makes DIR/kn-venv with
knowledge-neurons==0.0.2 and transformers<5; pass `--peers DIR` or set $KVMEM_PEERS, or give its
python with `--peer-python`) on the very same factworld weights in Hugging Face form, through a
subprocess. The plain per-layer loop `speed` times is `per_layer_ig` of tests/reference.py, the
reference the tests check kvmem's IG against. PARAREL is read from --pararel, else from the data
folder (--data, $KVMEM_DATA, or ../shared/data beside the repository).

Where kvmem and knowledge-neurons 0.0.2 differ (GPT-2 models), all checked in `peer`:
- site: the peer patches `mlp.c_fc`'s output, the *pre*-GELU activation (`hook_pre`); kvmem
  integrates over `hook_post` (the key coefficient that multiplies each value vector).
  kvmem's `site="pre"` reproduces the peer.
- rule: the peer uses `torch.linspace(0, 1, steps)` (alpha = 0 and 1 both included) and divides
  the summed gradients by `steps`; Dai et al.'s code uses alpha = k/m, k = 0..m-1 (left rule);
  kvmem defaults to `rule="auto"` (the midpoint rule; the geometric rule on models that normalise
  the MLP output, like Gemma-3), and `rule="linspace"` / `rule="left"` reproduce the others.
- multi-token targets: the peer (model_type="gpt") appends the model's *argmax* token, re-tokenizes,
  moves the patched position to the new last token and averages per-token attributions; kvmem
  teacher-forces the gold tokens, keeps the patch at the last prompt position and attributes the
  product of the token probabilities. (`model_type="gpt2"` silently uses only the first token.)
- tokens: the peer tokenizes the prompt as given (no BOS; pass it in the string) and the target
  as given (the leading space is the caller's job); kvmem adds both by the model's rules.
- refinement: the peer keeps neurons shared by *more than* p x n prompts (default p = 0.5,
  adaptive threshold 0.3); Dai et al. (and kvmem) keep those shared by *at least* p x n
  (p = 0.7, t = 0.2).
- enhance: the peer doubles the pre-GELU value (GELU(2x) != 2 GELU(x)); kvmem and Dai et al.
  double the post-activation. Suppression agrees (GELU(0) = 0).

Results go to benchmarks/results/neurons/neurons_<command>[_<model>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from common import (add_data_arguments, add_peer_arguments, command_line, data_file, pearson, peer_python,
                    provenance, reference, results_dir)

PEER_CODE = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast
from knowledge_neurons import KnowledgeNeurons
model = GPT2LMHeadModel.from_pretrained(args["folder"]).eval()
try:
    tok = AutoTokenizer.from_pretrained(args["folder"])
except ValueError:  # a folder written by transformers 5 names a tokenizer class 4.x lacks
    eot = "<|endoftext|>"
    # GPT-2's tokenizer returns no token_type_ids: GPT2Model would add wte[0] for each one given,
    # and the peer passes the tokenizer's whole output to the model.
    tok = PreTrainedTokenizerFast(tokenizer_file=args["folder"] + "/tokenizer.json", bos_token=eot,
                                  eos_token=eot, unk_token=eot, pad_token=eot,
                                  model_input_names=["input_ids", "attention_mask"])
kn = KnowledgeNeurons(model, tok, model_type=args["model_type"], device="cpu")
scores, seconds = [], []
for i, (prompt, target) in enumerate(args["items"]):
    if i == 0:
        kn.get_scores(prompt, target, batch_size=args["batch_size"], steps=args["steps"], pbar=False)  # warm-up
    t = time.perf_counter()
    s = kn.get_scores(prompt, target, batch_size=args["batch_size"], steps=args["steps"], pbar=False)
    seconds.append(time.perf_counter() - t)
    scores.append(s.detach().float())
torch.save({"scores": scores, "seconds": seconds}, args["out"])
"""


def run_peer(folder: Path, items: list[tuple[str, str]], steps: int, batch_size: int, threads: int,
             peer_python: str, model_type: str = "gpt2") -> dict:
    with tempfile.TemporaryDirectory(prefix="kvmem-peer-") as tmp:
        out = Path(tmp) / "peer.pt"
        args = dict(folder=str(folder), items=items, steps=steps, batch_size=batch_size, threads=threads,
                    out=str(out), model_type=model_type)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([peer_python, "-c", PEER_CODE, json.dumps(args)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"peer failed:\n{proc.stderr[-3000:]}")
        return torch.load(out)


def load(name: str):
    from kvmem.models import load_model

    if name == "tiny-random":
        from common import tiny_random_model

        model = tiny_random_model(n_ctx=64)
    else:
        model = load_model(name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_gpt2_folder(folder: Path, seed: int = 0) -> Path:
    """A small random GPT-2 saved in Hugging Face form (for runs before factworld's weights exist)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kvmem.models.tokenizers import gpt2_tokenizer

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_inner=256, n_positions=64, vocab_size=50257,
                     activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def hf_pair(name: str, tmp: Path):
    """(kvmem model on the installed backend, Hugging Face folder) holding the same GPT-2 weights."""
    if name == "factworld":
        from kvmem.factworld import factworld_hf_folder

        return load("factworld"), factworld_hf_folder()
    if name != "random-gpt2":
        raise SystemExit("the peer runs on Hugging Face GPT-2 folders: --model factworld or random-gpt2")
    from kvmem.models.folder import load_hf_folder
    from kvmem.models.tokenizers import gpt2_tokenizer

    folder = random_gpt2_folder(tmp / "random-gpt2")
    model = load_hf_folder(folder, tokenizer=gpt2_tokenizer())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, folder


def items_for(name: str, n: int, seed: int) -> list[tuple[str, str, str]]:
    if name == "factworld":
        return factworld_items(n, seed)
    from kvmem.data import builtin_facts

    facts = builtin_facts()[:n]
    return [(f.prompt, " " + f.target_true.strip(), f.relation_id or "") for f in facts]


def factworld_items(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, target with leading space, relation) for n facts spread over the relations."""
    from kvmem.factworld import shipped_world

    world = shipped_world()
    gen = torch.Generator().manual_seed(seed)
    by_rel = defaultdict(list)
    for f in world.facts("train"):
        by_rel[f.relation].append(f)
    out, rels = [], sorted(by_rel)
    for i in range(n):
        facts = by_rel[rels[i % len(rels)]]
        f = facts[int(torch.randint(len(facts), (1,), generator=gen))]
        out.append((f.prompt, f.target, f.relation))
    return out


def timed(fn, repeats: int = 3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return result, min(times)


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    ta = set(a.flatten().topk(k).indices.tolist())
    tb = set(b.flatten().topk(k).indices.tolist())
    return len(ta & tb) / k


def coarse_jaccard(a: torch.Tensor, b: torch.Tensor, t: float = 0.2) -> float:
    sa = set(torch.nonzero(a.flatten() > t * a.max()).flatten().tolist())
    sb = set(torch.nonzero(b.flatten() > t * b.max()).flatten().tolist())
    return len(sa & sb) / max(1, len(sa | sb))


# --------------------------------------------------------------------------------------------

def cmd_speed(args) -> dict:
    from kvmem.neurons import integrated_gradients, resolve_rule

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="kvmem-bench-neurons-"))
    peer_ok = args.model in ("factworld", "random-gpt2") and not args.no_peer
    if peer_ok:
        model, folder = hf_pair(args.model, tmp)
        prompt, target, _ = items_for(args.model, 1, args.seed)[0]
    else:
        model = load(args.model)
        prompt, target = args.prompt, args.target
    out = {"model": args.model, "prompt": prompt, "target": target, "steps": args.steps, "threads": args.threads,
           "n_layers": model.cfg.n_layers, "d_mlp": model.cfg.d_mlp, "date": time.strftime("%Y-%m-%d %H:%M UTC"),
           "load_avg": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
    # Peer-matching definition (pre-GELU, linspace) so all three compute the same numbers.
    ours, t_ours = timed(lambda: integrated_gradients(model, prompt, target, steps=args.steps, rule="linspace",
                                                      site="pre"), args.repeats)
    out["kvmem_s"] = t_ours
    _, t_default = timed(lambda: integrated_gradients(model, prompt, target, steps=args.steps), args.repeats)
    out["kvmem_default_s"] = t_default
    out["default_rule"] = resolve_rule(model, "auto")
    if not args.no_loop:
        per_layer_ig = reference().per_layer_ig
        layers = range(model.cfg.n_layers)
        loop, t_loop = timed(lambda: per_layer_ig(model, prompt, target, layers, args.steps, "linspace", "pre"),
                             max(1, args.repeats - 2))
        out["loop_s"] = t_loop
        out["loop_max_rel_diff"] = float((loop - ours.scores).abs().max() / ours.scores.abs().max())
    if peer_ok:
        bos = model.tokenizer.bos_token
        peer = run_peer(folder, [(bos + prompt, target)], args.steps, args.steps, args.threads,
                        peer_python(args, "knowledge-neurons"))
        out["peer_s"] = min(peer["seconds"])
        out["peer_max_rel_diff"] = float((peer["scores"][0] - ours.scores).abs().max() / ours.scores.abs().max())
        out["speedup_vs_peer"] = out["peer_s"] / t_ours
    if "loop_s" in out:
        out["speedup_vs_loop"] = out["loop_s"] / t_ours
    if args.completeness:
        out["completeness"] = completeness_rows(model, prompt, target, args.completeness)
        out["path"] = path_profile(model, prompt, target)
    return out


PATH_GRID = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5, 1.0)


def path_profile(model, prompt: str, target: str) -> dict:
    """g(a) = p(target) with one layer's last-position neurons scaled by a, on a log-ish grid: where
    along IG's straight path the probability actually changes."""
    from kvmem.neurons import teacher_forced
    from kvmem.core.weights import hook_post_name

    prep = teacher_forced(model, prompt, target)
    tokens = prep.tokens[None].expand(len(PATH_GRID), -1)
    grid = torch.tensor(PATH_GRID)
    out = {}
    for layer in range(model.cfg.n_layers):
        def scale(act, hook):
            act = act.clone()
            act[:, prep.last_pos] = act[:, prep.last_pos] * grid.to(act)[:, None]
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_post_name(model, layer), scale)])
        logp = logits[:, prep.last_pos].float().log_softmax(-1)[:, prep.target_ids[0]]
        out[str(layer)] = logp.exp().tolist()
    return {"grid": list(PATH_GRID), "p_by_layer": out}


def completeness_rows(model, prompt: str, target: str, settings: list[str]) -> list[dict]:
    """IG completeness per quadrature rule and step count (default site hook_post): per layer the sum
    of its attributions vs f(x) - f(baseline); the worst layer, and the top-5 neurons."""
    from kvmem.neurons import integrated_gradients

    rows = []
    for item in settings:
        rule, steps = item.split(":")
        a = integrated_gradients(model, prompt, target, steps=int(steps), rule=rule)
        gap = a.completeness_gap
        worst = int(gap.abs().argmax())
        delta = a.prob - a.baseline_probs
        flat = a.scores.flatten().topk(5).indices
        rows.append({"rule": rule, "steps": int(steps), "worst_layer": a.layers[worst],
                     "worst_gap": float(gap[worst]), "worst_delta": float(delta[worst]),
                     "layers_gap_over_10pct": [a.layers[i] for i in range(len(a.layers))
                                               if abs(float(gap[i])) > 0.1 * max(abs(float(delta[i])), 1e-12)],
                     "top5": [f"L{a.layers[int(i) // a.scores.shape[1]]}/{int(i) % a.scores.shape[1]}" for i in flat]})
    return rows


def effects_markdown(name: str, result: dict, command: str) -> str:
    """Dai et al.'s suppress / amplify table for this run, per relation, and the layer distribution."""
    s, cfg = result["summary"], result["config"]
    ok = [r for r in result["facts"] if r["n_neurons"]]
    pct = lambda v: f"{100 * v:+.1f}%"  # noqa: E731
    n_prompts = sum(len(r["prompts"]) for r in ok) / max(1, len(ok))
    lines = [f"# Knowledge neurons: suppress and amplify ({s['model']})", "",
             f"Measured by `{command}`; {s['facts']} PARAREL facts the model knows (top-{cfg['known_top_k']} on at "
             f"least {cfg['known_share']:.0%} of their prompts; prompts with the blank at the end) over "
             f"{s['relations']} relations, {n_prompts:.1f} prompts per fact (at most {cfg['max_prompts']}). "
             f"Knowledge neurons: IG over every layer ({cfg['steps']} steps, {cfg.get('rule', 'midpoint')} rule, "
             f"`hook_post`, last position), threshold "
             f"{cfg['threshold']} x max, shared by at least {cfg['share']:.0%} of the prompts (share adjusted towards "
             f"{cfg['target_count']} neurons where possible); {s['facts_with_neurons']} facts have neurons, "
             f"{s['mean_neurons']:.1f} neurons on average. Random control: the same number of neurons in the same "
             f"layers, {cfg['controls']} draws. {s['seconds_all_facts'] / max(1, s['facts']):.0f} s per fact "
             f"({cfg['threads']} thread(s)).", "",
             "Relative change of the gold answer's probability:", "",
             "| neurons | suppress (x0) | amplify (x2) |", "|---|---:|---:|",
             f"| knowledge neurons, mean over facts | {pct(s['suppress_mean_over_facts'])} | "
             f"{pct(s['amplify_mean_over_facts'])} |",
             f"| random neurons, mean over facts | {pct(s['suppress_random_mean_over_facts'])} | "
             f"{pct(s['amplify_random_mean_over_facts'])} |",
             f"| knowledge neurons, Dai et al.'s aggregate (per relation, then mean) | "
             f"{pct(s['suppress_dai_per_relation'])} | {pct(s['amplify_dai_per_relation'])} |",
             f"| random neurons, Dai et al.'s aggregate | {pct(s['suppress_random_dai_per_relation'])} | "
             f"{pct(s['amplify_random_dai_per_relation'])} |",
             "| Dai et al. 2022, BERT-base (published): knowledge / random | -29.0% / -1.5% | +31.2% / -1.3% |", "",
             "Per relation (means over its facts):", "",
             "| relation | facts | neurons | suppress | random | amplify | random |", "|---|---:|---:|---:|---:|---:|---:|"]
    by_rel = defaultdict(list)
    for r in ok:
        by_rel[r["relation"]].append(r)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for rel in sorted(by_rel):
        rs = by_rel[rel]
        lines.append(f"| {rel} | {len(rs)} | {mean([r['n_neurons'] for r in rs]):.1f} | "
                     f"{pct(mean([r['suppress'] for r in rs]))} | {pct(mean([r['suppress_random'] for r in rs]))} | "
                     f"{pct(mean([r['amplify'] for r in rs]))} | {pct(mean([r['amplify_random'] for r in rs]))} |")
    dist = s["layer_distribution"]
    top = sorted(dist.items(), key=lambda kv: -kv[1])[:5]
    lines += ["", "Layer distribution of the knowledge neurons (share of all): "
              + ", ".join(f"layer {k}: {100 * v:.1f}%" for k, v in dist.items() if v > 0)
              + f". Largest: {', '.join(f'{k} ({100 * v:.0f}%)' for k, v in top)}. Figure: `{name}_layers.png`.",
              "", "Per-fact rows (prompts, neurons, probabilities before / after): the JSON next to this file; the "
              "run resumes from its `.jsonl` log.", ""]
    return "\n".join(lines)


def speed_markdown(name: str, r: dict, command: str) -> str:
    """The speed (and completeness) result as a readable page."""
    lines = [f"# {name}: integrated gradients for one prompt, all layers", "",
             f"Measured by `{command}` ({r['date']}, {r['threads']} threads, load average {r['load_avg']}).", "",
             f"Prompt {r['prompt']!r} -> {r['target']!r}; {r['n_layers']} layers x {r['d_mlp']} neurons, "
             f"{r['steps']} steps. Times are the best of the repeats.", "",
             "| method | seconds | vs kvmem | max rel. diff vs kvmem |", "|---|---:|---:|---:|",
             f"| kvmem `integrated_gradients(..., rule=\"linspace\", site=\"pre\")` (the peer's definition) | "
             f"{r['kvmem_s']:.3g} | 1.00x | - |",
             f"| kvmem default (`hook_post`, rule=\"auto\": {r.get('default_rule', 'midpoint')}) | {r['kvmem_default_s']:.3g} | "
             f"{r['kvmem_default_s'] / r['kvmem_s']:.2f}x | (other definition) |"]
    if "loop_s" in r:
        lines.append(f"| plain per-layer loop (`per_layer_ig` in tests/reference.py) | {r['loop_s']:.3g} | "
                     f"{r['loop_s'] / r['kvmem_s']:.2f}x | {r['loop_max_rel_diff']:.2g} |")
    if "peer_s" in r:
        lines.append(f"| knowledge-neurons 0.0.2 (own venv, same weights in Hugging Face form) | {r['peer_s']:.3g} | "
                     f"{r['peer_s'] / r['kvmem_s']:.2f}x | {r['peer_max_rel_diff']:.2g} |")
    else:
        lines.append("| knowledge-neurons 0.0.2 | n/a (supports BERT, GPT-2, GPT-Neo only) | | |")
    if r.get("completeness"):
        lines += ["", "Completeness (sum of a layer's attributions vs f(x) - f(baseline), default `hook_post`):", "",
                  "| rule, steps | worst layer | gap / (f(x) - f(0)) there | layers with gap > 10% | top-5 neurons |",
                  "|---|---:|---|---|---|"]
        for c in r["completeness"]:
            lines.append(f"| {c['rule']}, {c['steps']} | {c['worst_layer']} | {c['worst_gap']:.3g} / "
                         f"{c['worst_delta']:.3g} | {', '.join(map(str, c['layers_gap_over_10pct'])) or 'none'} | "
                         f"{', '.join(c['top5'])} |")
    if r.get("path"):
        grid = r["path"]["grid"]
        lines += ["", "Where along the path the probability changes: p(first target token) with one layer's "
                  "last-position neurons scaled by a:", "",
                  "| layer | " + " | ".join(f"a={a:g}" for a in grid) + " |", "|---:" * (len(grid) + 1) + "|"]
        for layer, ps in r["path"]["p_by_layer"].items():
            lines.append(f"| {layer} | " + " | ".join(f"{v:.3f}" for v in ps) + " |")
    return "\n".join(lines) + "\n"


def cmd_peer(args) -> dict:
    """Agreement with knowledge-neurons 0.0.2 on the same GPT-2 weights, single-token targets."""
    from kvmem.neurons import integrated_gradients

    torch.set_num_threads(args.threads)
    model, folder = hf_pair(args.model, Path(tempfile.mkdtemp(prefix="kvmem-bench-neurons-")))
    items = items_for(args.model, args.n_facts, args.seed)
    bos = model.tokenizer.bos_token
    python = peer_python(args, "knowledge-neurons")
    peer = run_peer(folder, [(bos + p, t) for p, t, _ in items], args.steps, args.steps, args.threads, python)
    rows = []
    for (prompt, target, rel), ps in zip(items, peer["scores"]):
        same = integrated_gradients(model, prompt, target, steps=args.steps, rule="linspace", site="pre").scores
        dai = integrated_gradients(model, prompt, target, steps=args.steps, rule="left").scores
        default = integrated_gradients(model, prompt, target, steps=args.steps).scores
        rows.append({
            "prompt": prompt, "target": target, "relation": rel,
            "same_def_max_rel_diff": float((ps - same).abs().max() / ps.abs().max()),
            "same_def_top20_overlap": topk_overlap(ps, same, 20),
            "same_def_coarse_jaccard": coarse_jaccard(ps, same),
            "post_vs_peer_pearson": pearson(ps, default),
            "post_vs_peer_top20_overlap": topk_overlap(ps, default, 20),
            "post_vs_peer_coarse_jaccard": coarse_jaccard(ps, default),
            "left_vs_midpoint_top20_overlap": topk_overlap(dai, default, 20),
            "left_vs_midpoint_coarse_jaccard": coarse_jaccard(dai, default),
        })
    # Multi-token: " X." (object and the period that ends every training sentence).
    multi = []
    if args.n_multi:
        mitems = items[: args.n_multi]
        peer_m = run_peer(folder, [(bos + p, t + ".") for p, t, _ in mitems], args.steps,
                          args.steps, args.threads, python, model_type="gpt")
        for (prompt, target, _), ps in zip(mitems, peer_m["scores"]):
            ours = integrated_gradients(model, prompt, target + ".", steps=args.steps, rule="linspace", site="pre")
            first = integrated_gradients(model, prompt, target, steps=args.steps, rule="linspace", site="pre")
            multi.append({
                "prompt": prompt, "target": target + ".", "n_tokens": len(ours.target_ids),
                "teacher_forced_product_vs_peer_pearson": pearson(ps, ours.scores),
                "teacher_forced_product_vs_peer_top20": topk_overlap(ps, ours.scores, 20),
                "first_token_only_vs_peer_pearson": pearson(ps, first.scores),
            })
    keys = [k for k in rows[0] if k not in ("prompt", "target", "relation")]
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    summary["same_def_max_rel_diff_worst"] = max(r["same_def_max_rel_diff"] for r in rows)
    if multi:
        for k in [k for k in multi[0] if k not in ("prompt", "target", "n_tokens")]:
            summary["multi_" + k] = sum(r[k] for r in multi) / len(multi)
    return {"model": args.model, "n_facts": len(rows), "steps": args.steps, "summary": summary, "facts": rows, "multi_token": multi}


def cmd_specificity(args) -> dict:
    """Factworld: suppress a fact's knowledge neurons; its own probability vs other subjects' (same relation)."""
    from kvmem.factworld import shipped_world
    from kvmem.neurons import knowledge_neurons, neuron_effect

    torch.set_num_threads(args.threads)
    model = load("factworld")
    world = shipped_world()
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    rels = world.relation_ids[: args.relations]
    for rel in rels:
        facts = world.facts("train", rel)
        picks = torch.randperm(len(facts), generator=gen)[: args.facts_per_relation].tolist()
        for i in picks:
            fact = facts[i]
            prompts = [p.prompt for p in world.prompts_for(fact, "train") + world.prompts_for(fact, "paraphrase")]
            kn = knowledge_neurons(model, prompts, fact.target, steps=args.steps, threshold=args.threshold,
                                   share=args.share, target_count=tuple(args.target_count) if args.target_count else None,
                                   progress=False)
            if not kn.neurons:
                rows.append({"relation": rel, "subject": fact.subject, "n_neurons": 0})
                continue
            own = neuron_effect(model, prompts, fact.target, neurons=kn, factor=0.0, n_controls=args.controls, seed=args.seed)
            others = [f for f in world.neighbours(fact, k=args.others, same_object=False)]
            other_changes = []
            for o in others:
                ops = [p.prompt for p in world.prompts_for(o, "train")]
                other_changes.append(neuron_effect(model, ops, o.target, neurons=kn, factor=0.0, n_controls=0).relative_change)
            rows.append({
                "relation": rel, "subject": fact.subject, "target": fact.target, "n_neurons": len(kn.neurons),
                "layers": [l for l, _ in kn.neurons],
                "own_rel_change": own.relative_change, "own_random_rel_change": own.control_relative_change,
                "others_rel_change": sum(other_changes) / max(1, len(other_changes)),
            })
    ok = [r for r in rows if r["n_neurons"]]
    summary = {
        "facts": len(rows), "facts_with_neurons": len(ok),
        "mean_neurons": sum(r["n_neurons"] for r in ok) / max(1, len(ok)),
        "own_suppress": sum(r["own_rel_change"] for r in ok) / max(1, len(ok)),
        "others_suppress": sum(r["others_rel_change"] for r in ok) / max(1, len(ok)),
        "own_random_suppress": sum(r["own_random_rel_change"] for r in ok) / max(1, len(ok)),
        "layer_distribution": _layer_shares([l for r in ok for l in r["layers"]], model.cfg.n_layers),
        "command": command_line(__file__, args.argv),
    }
    return {"summary": summary, "facts": rows}


def _layer_shares(layers: list[int], n_layers: int) -> dict[str, float]:
    """Share of knowledge neurons in each layer."""
    total = max(1, len(layers))
    return {str(l): layers.count(l) / total for l in range(n_layers)}


def known_bags(model, args):
    """PARAREL bags with the blank at the end whose answer the model ranks first on >= half its prompts."""
    from kvmem.data import load_pararel
    from kvmem.core.facts import Fact
    from kvmem.recall import fact_recall

    bags = load_pararel(data_file(args, "pararel"), relations=args.only, min_prompts=args.min_prompts,
                        limit_per_relation=args.scan_per_relation)
    by_rel = defaultdict(list)
    for b in bags:
        by_rel[b.relation].append(b)
    rels = sorted(by_rel)
    chosen = []
    for rel in rels:
        cands = by_rel[rel]
        facts = [Fact(p, p, target_true=b.target) for b in cands for p in b.prompts[: args.max_prompts]]
        owner = [i for i, b in enumerate(cands) for _ in b.prompts[: args.max_prompts]]
        try:
            res = fact_recall(model, facts, batch_size=32)
        except Exception:  # a target the tokenizer cannot take: skip the relation
            continue
        hits = defaultdict(list)
        for i, r in zip(owner, res.ranks.tolist()):
            hits[i].append(r < args.known_top_k)
        known = [cands[i] for i in sorted(hits) if sum(hits[i]) >= args.known_share * len(hits[i])]
        chosen.append((rel, known[: args.facts_per_relation]))
    chosen = [(r, k) for r, k in chosen if k]
    chosen.sort(key=lambda rk: -len(rk[1]))
    return chosen[: args.relations]


def _stem(args) -> str:
    name = f"neurons_{args.command}" + ("" if args.model == "factworld" else f"_{args.model}")
    return name + (f"_{args.tag}" if args.tag else "")


def _effects_row(model, args, rel: str, target: str, prompts: list[str]) -> dict:
    """Knowledge neurons of one PARAREL bag, then suppress (x0) / amplify (x2) them vs random neurons."""
    from kvmem.errors import KvmemError
    from kvmem.neurons import knowledge_neurons, neuron_effect

    try:
        kn = knowledge_neurons(model, prompts, target, steps=args.steps, rule=args.rule, threshold=args.threshold,
                               share=args.share, min_shared=args.min_shared,
                               target_count=tuple(args.target_count) if args.target_count else None,
                               progress=False)
    except KvmemError as e:  # e.g. a target that does not tokenize as given after these prompts
        return {"relation": rel, "target": target, "prompts": prompts, "n_neurons": 0, "skipped": str(e)}
    row = {"relation": rel, "target": target, "prompts": prompts, "n_neurons": len(kn.neurons),
           "neurons": [list(n) for n in kn.neurons], "share_used": kn.share,
           "completeness_gap_max": max(float(a.completeness_gap.abs().max()) for a in kn.attributions),
           "p_max": max(a.prob for a in kn.attributions)}
    if kn.neurons:
        for name, factor in (("suppress", 0.0), ("amplify", 2.0)):
            eff = neuron_effect(model, prompts, target, neurons=kn, factor=factor, n_controls=args.controls, seed=args.seed)
            row[name] = eff.relative_change
            row[name + "_random"] = eff.control_relative_change
            row[name + "_p_before"] = eff.p_before.tolist()
            row[name + "_p_after"] = eff.p_after.tolist()
            row[name + "_p_random"] = eff.p_control.mean(0).tolist()
    return row


def cmd_effects(args) -> dict:
    """Dai et al.'s table: relative change of p(gold) suppressing / amplifying knowledge neurons vs random."""
    from tqdm.auto import tqdm

    from kvmem.runs import RunLog

    torch.set_num_threads(args.threads)
    model = load(args.model)
    t0 = time.perf_counter()
    chosen = known_bags(model, args)
    todo = [(rel, b) for rel, bags in chosen for b in bags]
    # One line per finished fact: a Gemma run takes hours on 2 cores, so an interrupted run resumes.
    from kvmem.neurons import resolve_rule

    args.rule = resolve_rule(model, args.rule)
    settings = {k: getattr(args, k) for k in ("model", "steps", "rule", "seed", "max_prompts", "known_top_k",
                                              "known_share", "threshold", "share", "min_shared", "target_count",
                                              "controls")}
    log = RunLog(Path(args.out_dir) / f"{_stem(args)}.jsonl", settings, restart=args.restart)
    for rel, bag in tqdm(todo, desc="facts", disable=not args.progress):
        prompts = list(bag.prompts[: args.max_prompts])
        key = f"{rel}|{bag.target}|{prompts[0]}"
        if key in log:
            continue
        t_fact = time.perf_counter()
        row = _effects_row(model, args, rel, bag.target, prompts)
        row["seconds"] = round(time.perf_counter() - t_fact, 2)
        log.add(key, row)
    wanted = {f"{rel}|{b.target}|{b.prompts[0]}" for rel, b in todo}
    rows = [r for k, r in log.records().items() if k in wanted]
    ok = [r for r in rows if r["n_neurons"]]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    summary = {"model": args.model, "facts": len(rows), "relations": len({r["relation"] for r in rows}),
               "facts_with_neurons": len(ok), "mean_neurons": mean(r["n_neurons"] for r in ok),
               "seconds_this_invocation": time.perf_counter() - t0,
               "seconds_all_facts": sum(r.get("seconds", 0.0) for r in rows)}
    for name in ("suppress", "amplify"):
        summary[f"{name}_mean_over_facts"] = mean(r[name] for r in ok)
        summary[f"{name}_random_mean_over_facts"] = mean(r[name + "_random"] for r in ok)
        # Dai et al.: per relation, mean change / mean original probability over all its prompts; then mean.
        per_rel = defaultdict(lambda: [0.0, 0.0, 0.0])
        for r in ok:
            acc = per_rel[r["relation"]]
            acc[0] += sum(r[name + "_p_after"]) - sum(r[name + "_p_before"])
            acc[1] += sum(r[name + "_p_random"]) - sum(r[name + "_p_before"])
            acc[2] += sum(r[name + "_p_before"])
        summary[f"{name}_dai_per_relation"] = mean(a[0] / a[2] for a in per_rel.values())
        summary[f"{name}_random_dai_per_relation"] = mean(a[1] / a[2] for a in per_rel.values())
    layers = Counter(l for r in ok for l, _ in r["neurons"])
    total = sum(layers.values()) or 1
    summary["layer_distribution"] = {str(l): layers.get(l, 0) / total for l in range(model.cfg.n_layers)}
    return {"summary": summary, "config": {k: v for k, v in vars(args).items() if k not in ("func", "argv")}, "facts": rows}


def write(name: str, result: dict, out_dir: Path, prov: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({**result, "provenance": prov}, indent=1, default=str))
    summary = result.get("summary", result)
    command = prov["command"]
    lines = [f"# {name}", "", f"`{command}` ({prov['date']}, {prov['machine']}; commit {prov['commit']})", "",
             "| key | value |", "|---|---|"]
    for k, v in summary.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b:.3f}" if isinstance(b, float) else f"{a}: {b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.4g}"
        lines.append(f"| {k} | {v} |")
    if name.startswith("neurons_effects") and "facts" in result:
        lines = [effects_markdown(name, result, command)]
    if name.startswith("neurons_speed"):
        lines = [speed_markdown(name, summary, command)]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    if name.startswith("neurons_effects"):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            dist = summary["layer_distribution"]
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.bar([int(k) for k in dist], [100 * v for v in dist.values()])
            ax.set_xlabel("layer")
            ax.set_ylabel("% of knowledge neurons")
            ax.set_title(f"{summary['model']}: {summary['facts_with_neurons']} facts")
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}_layers.png", dpi=100)
            plt.close(fig)
        except Exception as e:  # pragma: no cover - the figure is a convenience
            print(f"figure skipped: {e}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["speed", "peer", "specificity", "effects"])
    ap.add_argument("--model", default="factworld")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rule", default="auto", help="effects: IG quadrature rule (kvmem.neurons.RULES or auto)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    add_peer_arguments(ap)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-loop", action="store_true")
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--target", default="Paris")
    ap.add_argument("--n-facts", type=int, default=12)
    ap.add_argument("--n-multi", type=int, default=4)
    ap.add_argument("--relations", type=int, default=10)
    ap.add_argument("--facts-per-relation", type=int, default=8)
    ap.add_argument("--scan-per-relation", type=int, default=150, help="bags scanned per relation for known facts")
    ap.add_argument("--only", nargs="+", default=None, help="PARAREL relation ids to use (default all)")
    ap.add_argument("--max-prompts", type=int, default=6)
    ap.add_argument("--min-prompts", type=int, default=2)
    ap.add_argument("--known-top-k", type=int, default=1)
    ap.add_argument("--known-share", type=float, default=0.5)
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--share", type=float, default=0.7)
    ap.add_argument("--min-shared", type=int, default=1)
    ap.add_argument("--target-count", type=int, nargs=2, default=[2, 5])
    ap.add_argument("--no-target-count", dest="target_count", action="store_const", const=None)
    ap.add_argument("--controls", type=int, default=3)
    ap.add_argument("--others", type=int, default=5)
    add_data_arguments(ap, "pararel")
    ap.add_argument("--out-dir", default=str(results_dir("neurons")))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--completeness", nargs="*", default=[], metavar="RULE:STEPS",
                    help="speed: also IG completeness for these settings, e.g. midpoint:20 left:20 midpoint:80")
    ap.add_argument("--restart", action="store_true", help="effects: discard the per-fact log instead of resuming it")
    args = ap.parse_args(argv)
    args.argv = argv
    torch.manual_seed(args.seed)
    result = {"speed": cmd_speed, "peer": cmd_peer, "specificity": cmd_specificity, "effects": cmd_effects}[
        args.command](args)
    name = _stem(args)
    path = write(name, result, Path(args.out_dir), provenance(__file__, argv))
    print(json.dumps(result.get("summary", result), indent=1, default=str))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
