"""Train the factworld model from a seed: `python -m kvmem.factworld.train --seed 0 --out DIR`.

Deterministic on CPU for a given seed and thread count: the world, the weight initialisation
(a `torch.Generator`) and the data order (a `random.Random`) depend only on the seed; no global
random state is read, and the model has no dropout.

Training text (only TRAINING templates; paraphrase templates are never seen):
  - single-fact sequences: `<|endoftext|>` + prompt + object + "." + `<|endoftext|>`;
  - packed documents of `n_positions` tokens: short biographies (1-4 facts of one subject,
    distinct relations, random training templates) one after another, several subjects per
    document, truncated at the context length.
Loss: next-token cross-entropy on every token (the object token of single-fact sequences
weighted `object_weight` times), computed over the compact vocabulary as if the other
50257 - n_used GPT-2 tokens existed with logit 0 (see export.py), so the exported full model is
exactly the trained one.

Subject funnel (`funnel`, the fraction of sequences it applies to): in those sequences no
position after a subject may attend to the subject's tokens other than its LAST one. Without
it the model (4 or 6 layers alike) recalls facts late: the final position reads the first
token of each name part and looks the fact up in its own last MLP, so restoring the last
subject token in a causal trace recovers nothing. With it (0.5), the subject is assembled at
its last token (layer-0 attention), the facts are looked up there by the layer-0 MLP, and
upper-layer attention at the prompt's end reads them out: restoring the residual at the last
subject token recovers ~60% of the answer's probability (ROME's "early site"), the MLP-0
output there ~59%, the last layer's attention output at the final token ~80% (the "late
site"). At inference the mask is gone (a plain GPT-2); half of training sees no mask, so the
model works both ways.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvmem.factworld.export import EOT_ID, FULL_VOCAB, new_compact_model, save_compact
from kvmem.factworld.world import FactWorld, build_world


@dataclass
class TrainConfig:
    seed: int = 0
    n_subjects: int = 320
    # model
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512
    n_positions: int = 64
    # optimisation
    steps: int = 3000
    packed_batch: int = 16  # documents of n_positions tokens per step
    single_batch: int = 32  # single-fact sequences per step
    lr: float = 3e-3
    min_lr_frac: float = 0.02
    warmup: int = 200
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    funnel: float = 0.5  # fraction of sequences trained with the subject funnel mask (see below)
    object_weight: float = 4.0  # extra loss weight on the object token of single-fact sequences
    eval_every: int = 500
    eval_prompts: int = 600
    threads: int = 1  # results are bitwise reproducible for a fixed thread count

    def model_cfg(self) -> dict:
        return dict(
            n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, n_inner=self.n_inner,
            n_positions=self.n_positions, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        )


# ---------------------------------------------------------------------------------------------
# Data


class Corpus:
    """Pre-tokenized training sentences, in compact ids."""

    def __init__(self, world: FactWorld, tokenizer):
        self.world = world
        self.n_subjects = len(world.subjects)
        self.n_relations = len(world.relations)
        keys, texts = [], []
        for si, s in enumerate(world.subjects):
            for ri, rel in enumerate(world.relations):
                for ti, t in enumerate(rel.train_templates):
                    sent = world.sentence(s, rel.id, t)
                    keys.append((si, ri, ti))
                    texts.append(sent)
        enc_start = tokenizer(texts, add_special_tokens=False)["input_ids"]
        enc_mid = tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]
        # Subject token spans inside each sentence (start / mid variants).
        subj_len = {
            (s, lead): len(tokenizer.encode(lead + s, add_special_tokens=False))
            for s in world.subjects for lead in ("", " ")
        }
        prefix_len = {}
        for rel in world.relations:
            for t in rel.train_templates:
                before = t[: t.index("{}")].rstrip(" ")
                for variant, text in (("start", before), ("mid", " " + before if before else "")):
                    prefix_len[(t, variant)] = len(tokenizer.encode(text, add_special_tokens=False)) if text else 0
        self.span_start, self.span_mid = {}, {}
        for (si, ri, ti), e0, e1 in zip(keys, enc_start, enc_mid):
            s, t = world.subjects[si], world.relations[ri].train_templates[ti]
            lead0 = "" if t.startswith("{}") else " "
            a0 = prefix_len[(t, "start")]
            a1 = prefix_len[(t, "mid")]
            self.span_start[(si, ri, ti)] = (a0, a0 + subj_len[(s, lead0)])
            self.span_mid[(si, ri, ti)] = (a1, a1 + subj_len[(s, " ")])
            for e, (x, y), lead in ((e0, self.span_start[(si, ri, ti)], lead0), (e1, self.span_mid[(si, ri, ti)], " ")):
                assert e[x:y] == tokenizer.encode(lead + s, add_special_tokens=False), (s, t)
        # Every token that any training text or any evaluation prompt can contain.
        used = {EOT_ID}
        for e in enc_start + enc_mid:
            used.update(e)
        for rel in world.relations:
            for t in rel.paraphrase_templates:
                for s in world.subjects:
                    used.update(tokenizer.encode(t.replace("{}", s), add_special_tokens=False))
        self.used_token_ids = sorted(used)
        remap = {tid: i for i, tid in enumerate(self.used_token_ids)}
        self.bos = self.eos = remap[EOT_ID]
        self.start = {k: [remap[t] for t in e] for k, e in zip(keys, enc_start)}
        self.mid = {k: [remap[t] for t in e] for k, e in zip(keys, enc_mid)}
        self.n_templates = [len(r.train_templates) for r in world.relations]

    def single(self, rng: random.Random) -> tuple[list[int], list[tuple[int, int]]]:
        """BOS + one training sentence + EOS, and the subject's token span."""
        si = rng.randrange(self.n_subjects)
        ri = rng.randrange(self.n_relations)
        ti = rng.randrange(self.n_templates[ri])
        a, b = self.span_start[(si, ri, ti)]
        return [self.bos] + self.start[(si, ri, ti)] + [self.eos], [(a + 1, b + 1)]

    def packed(self, rng: random.Random, length: int) -> tuple[list[int], list[tuple[int, int]]]:
        """BOS + short biographies of random subjects, cut at `length` tokens; subject spans."""
        ids = [self.bos]
        spans = []
        first = True
        while len(ids) < length:
            si = rng.randrange(self.n_subjects)
            for ri in rng.sample(range(self.n_relations), rng.randint(1, 4)):
                ti = rng.randrange(self.n_templates[ri])
                a, b = (self.span_start if first else self.span_mid)[(si, ri, ti)]
                spans.append((len(ids) + a, len(ids) + b))
                ids += (self.start if first else self.mid)[(si, ri, ti)]
                first = False
        return ids[:length], [(a, b) for a, b in spans if b <= length]


def _masks(spans_per_seq, funnel_flags, width: int) -> torch.Tensor:
    """Boolean attention masks [batch, 1, width, width] (True = may attend): causal, and for
    sequences flagged for the funnel, no position after a subject may attend to that subject's
    tokens other than its last one."""
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    mask = causal.repeat(len(spans_per_seq), 1, 1, 1)
    for i, (spans, flag) in enumerate(zip(spans_per_seq, funnel_flags)):
        if flag:
            for a, b in spans:
                mask[i, 0, b:, a : b - 1] = False
    return mask


def _single_batch(corpus: Corpus, rng: random.Random, n: int, funnel: float):
    seqs = [corpus.single(rng) for _ in range(n)]
    flags = [rng.random() < funnel for _ in range(n)]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((n, width), corpus.eos, dtype=torch.long)
    weight = torch.zeros(n, width - 1)
    for i, (s, _) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        weight[i, : len(s) - 1] = 1.0
    return ids, weight, _masks([sp for _, sp in seqs], flags, width - 1)


def _packed_batch(corpus: Corpus, rng: random.Random, n: int, n_positions: int, funnel: float):
    seqs = [corpus.packed(rng, n_positions + 1) for _ in range(n)]
    flags = [rng.random() < funnel for _ in range(n)]
    ids = torch.tensor([s for s, _ in seqs], dtype=torch.long)
    return ids, torch.ones(n, n_positions), _masks([sp for _, sp in seqs], flags, n_positions)


def phantom_nll(logits: torch.Tensor, targets: torch.Tensor, n_phantom: int) -> torch.Tensor:
    """Per-token NLL of `targets` under softmax over [logits, n_phantom zeros]."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    if n_phantom > 0:
        lse = torch.logaddexp(lse, torch.tensor(math.log(n_phantom), dtype=lse.dtype))
    return lse - logits.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Model


def init_weights(model, generator: torch.Generator, n_layer: int) -> None:
    """GPT-2 initialisation drawn from `generator` (no global RNG)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02 / math.sqrt(2 * n_layer), generator=generator)
            else:
                p.normal_(0.0, 0.02, generator=generator)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, out: Path | str | None = None, log=print):
    """Train; returns (compact model, used_token_ids, log dict). Writes weights if `out`.
    Runs with `cfg.threads` torch threads (restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg, out, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, out: Path | str | None, log):
    from kvmem.factworld import (
        accuracy_by_relation,
        accuracy_by_template,
        evaluate_accuracy,
        factworld_tokenizer,
    )

    torch.set_num_threads(cfg.threads)
    t0, c0 = time.time(), time.process_time()
    tok = factworld_tokenizer()
    world = build_world(cfg.seed, cfg.n_subjects, tokenizer=tok)
    world.validate(tok)
    corpus = Corpus(world, tok)
    used = corpus.used_token_ids
    n_phantom = FULL_VOCAB - len(used)
    log(f"world: {len(world.subjects)} subjects x {len(world.relations)} relations = {len(world)} facts; "
        f"{len(used)} used tokens")

    model = new_compact_model(cfg.model_cfg(), used)
    gen = torch.Generator().manual_seed(cfg.seed)
    init_weights(model, gen, cfg.n_layer)
    model.tie_weights()
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    rng = random.Random(f"kvmem-factworld-train-{cfg.seed}")
    history = []
    running = None
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        ids_p, w_p, m_p = _packed_batch(corpus, rng, cfg.packed_batch, cfg.n_positions, cfg.funnel)
        ids_s, w_s, m_s = _single_batch(corpus, rng, cfg.single_batch, cfg.funnel)
        if cfg.object_weight != 1.0:
            # the object is the token before "." and EOS: position len-3 predicts it
            lens = (w_s.sum(1)).long()
            w_s[torch.arange(len(lens)), lens - 3] = cfg.object_weight
        nll_p = phantom_nll(model(input_ids=ids_p[:, :-1], attention_mask=m_p).logits, ids_p[:, 1:], n_phantom)
        nll_s = phantom_nll(model(input_ids=ids_s[:, :-1], attention_mask=m_s).logits, ids_s[:, 1:], n_phantom)
        loss = ((nll_p * w_p).sum() + (nll_s * w_s).sum()) / (w_p.sum() + w_s.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            kw = dict(used_token_ids=used, tokenizer=tok, max_prompts=cfg.eval_prompts, seed=step)
            acc_t = evaluate_accuracy(model, world, "train", **kw)
            acc_p = evaluate_accuracy(model, world, "paraphrase", **kw)
            model.train()
            rec = dict(step=step + 1, loss=round(running, 4), train=acc_t, paraphrase=acc_p,
                       seconds=round(time.time() - t0, 1))
            history.append(rec)
            log(json.dumps(rec))
    model.eval()
    train_seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    kw = dict(used_token_ids=used, tokenizer=tok)
    final = {
        "train": evaluate_accuracy(model, world, "train", **kw),
        "paraphrase": evaluate_accuracy(model, world, "paraphrase", **kw),
        "train_by_relation": accuracy_by_relation(model, world, "train", **kw),
        "paraphrase_by_relation": accuracy_by_relation(model, world, "paraphrase", **kw),
        "paraphrase_by_template": accuracy_by_template(model, world, "paraphrase", **kw),
    }
    log(json.dumps({k: v for k, v in final.items() if "_by_" not in k}))
    train_log = {
        "config": asdict(cfg),
        "train_seconds": round(train_seconds, 1),  # wall clock, including evaluations
        "cpu_seconds": round(cpu_seconds, 1),  # process CPU time (wall time on an idle machine)
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "accuracy": final,
        "history": history,
        "n_used_tokens": len(used),
        "n_facts": len(world),
    }
    if out is not None:
        out = Path(out)
        save_compact(
            model, used, cfg.model_cfg(), out,
            extra={"world": {"seed": cfg.seed, "n_subjects": cfg.n_subjects}},
        )
        (out / "train_log.json").write_text(json.dumps(train_log, indent=1) + "\n")
        log(f"wrote {out}")
    return model, used, train_log


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    p.add_argument("--out", type=Path, default=None, help="directory for the compact weights")
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    train(TrainConfig(**args), out)


if __name__ == "__main__":
    main()
