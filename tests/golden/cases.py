"""How every golden value is computed: the ONE place shared by `make_golden.py` (which writes the
`*.pt` files from the pre-refactor code) and `tests/test_golden.py` (which recomputes and compares).

Only kvmem's public API is used: names importable from top-level `kvmem` and the public names of
`kvmem.factworld`. Two things kvmem does not export at top level are written out here instead:

- `factworld_corpus` and `factworld_records` are plain equivalents of what the pre-refactor CLI
  built (`kvmem.cli.factworld_sentences`, `factworld_item(...).counterfact()`), written out so the
  golden values do not depend on where that code lives; today they equal `kvmem.factworld.corpus`
  and `kvmem.factworld.counterfact_records` (plus one generation prompt), checked by
  `tests/test_golden.py::test_golden_inputs_are_the_librarys_factworld_data`;
- the CounterFact record class is found by `counterfact_record_class()` (top-level `kvmem`, else
  `kvmem.data`, else the type hint of `kvmem.evaluate_counterfact`).

Every case returns `(inputs, values)`: `inputs` are plain Python values (strings, ints, floats,
tuples) saying what was computed; `values` are tensors (and floats) saying what came out. Both
are saved; the test checks the saved inputs equal the ones below before comparing values.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch

import kvmem
import kvmem.factworld as fw

GOLDEN_DIR = Path(__file__).resolve().parent

# --- inputs (change them only together with regenerating every *.pt file) ---------------------

SEED = 0
TRACE_SAMPLES = 3  # noise samples per causal trace
TRACE_FACT_INDEX = 0  # world.facts("train")[i]: the fact traced (case a) and attributed (case b)
IG_STEPS = 10  # integrated-gradients Riemann intervals (rule "auto" = midpoint on factworld)
STATS_LAYER = 0  # factworld's ROME edit layer (its preset), where C is estimated
STATS_N_TOKENS = 20_480  # 40 x d_mlp (512) keys: C is safely invertible, and it takes < 1 s
ROME_PREFIXES = ((5, 5), (10, 5))  # 11 contexts instead of ROME's 41: an edit takes ~1 s
RECORD_FACT_INDICES = (0, 321, 642)  # world.facts("train")[i]: 3 subjects x 3 relations (city, country, occupation)
N_NEIGHBOURS = 5
GEN_TOKENS = 20  # generation-entropy sample length (factworld's context is only 64 tokens)

GEMMA_FACT = dict(
    prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower", target_true="Paris",
)
GEMMA_KIND, GEMMA_WINDOW, GEMMA_SAMPLES = "mlp", 10, 3


# --- helpers ----------------------------------------------------------------------------------

def sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's exact bytes (dtype and shape included): equal hashes = bit-identical."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def freeze(model):
    """No parameter gradients (values are unaffected; ROME and IG only differentiate their own inputs)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_factworld():
    return freeze(kvmem.load_model("factworld"))


def load_gemma():
    return freeze(kvmem.load_model("gemma-3-270m"))


def world():
    return fw.shipped_world()


def world_fact_as_fact(wf) -> kvmem.Fact:
    """A factworld fact as a kvmem.Fact (the conversion `WorldFact`'s docstring gives)."""
    return kvmem.Fact(wf.prompt, wf.subject, target_true=wf.target, relation_id=wf.relation)


def factworld_corpus(w) -> list[str]:
    """The world's training sentences, shuffled with random.Random(0): ROME's "ordinary text" for
    factworld. Same as `kvmem.factworld.corpus(w)` (written out: see the module docstring)."""
    sents = [w.sentence(p.subject, p.relation, p.template) for p in w.all_prompts("train")]
    random.Random(0).shuffle(sents)
    return sents


def new_object(w, wf) -> str:
    """A deterministic false object of the same relation: the next one in the relation's list
    (the rule of `kvmem.factworld.counterfact_records` with seed=None)."""
    objects = w.relation(wf.relation).objects
    return objects[(objects.index(wf.target) + 1) % len(objects)]


def counterfact_record_class():
    """kvmem's CounterFact record dataclass, wherever the refactor puts it."""
    cls = getattr(kvmem, "CounterFactRecord", None)
    if cls is not None:
        return cls
    try:
        from kvmem.data import CounterFactRecord  # noqa: PLC0415 - its pre-refactor home

        return CounterFactRecord
    except ImportError:
        import typing

        return typing.get_type_hints(kvmem.evaluate_counterfact)["records"].__args__[0]


def factworld_records(w, indices=RECORD_FACT_INDICES) -> list:
    """CounterFact-style records from the fact world, as `kvmem.factworld.counterfact_records` builds
    them: request = the fact under its first training template with target_new the next
    object; paraphrases = its held-out templates; neighbours = the first N_NEIGHBOURS other subjects
    with the same object; plus one generation prompt (the request's prompt) so GE is covered too."""
    Record = counterfact_record_class()
    facts = w.facts("train")
    out = []
    for i in indices:
        wf = facts[i]
        req = kvmem.Fact(wf.prompt, wf.subject, target_true=wf.target, target_new=new_object(w, wf),
                         relation_id=wf.relation)
        out.append(Record(
            case_id=i, request=req, template=wf.template,
            paraphrase_prompts=tuple(p.prompt for p in w.prompts_for(wf, "paraphrase")),
            neighborhood_prompts=tuple(n.prompt for n in w.neighbours(wf, k=N_NEIGHBOURS, same_object=True)),
            attribute_prompts=(), generation_prompts=(wf.prompt,),
        ))
    return out


def rome_hparams() -> kvmem.RomeHparams:
    """ROME's defaults (explicit, so no preset is involved) with the edit layer and fewer prefixes."""
    return kvmem.RomeHparams(layer=STATS_LAYER, prefixes=ROME_PREFIXES)


def fact_inputs(f: kvmem.Fact) -> dict:
    return dict(prompt=f.prompt, subject=f.subject, target_true=f.target_true, target_new=f.target_new,
                relation_id=f.relation_id)


# --- the cases --------------------------------------------------------------------------------

def trace_factworld(model, w) -> tuple[dict, dict]:
    """(a) causal traces of one factworld fact: kind "mlp" (window 1) and kind "resid", every
    (layer, token) cell, default noise (3 x the subject embeddings' std), TRACE_SAMPLES samples."""
    fact = world_fact_as_fact(w.facts("train")[TRACE_FACT_INDEX])
    inputs = dict(fact=fact_inputs(fact), samples=TRACE_SAMPLES, seed=SEED,
                  kinds=(("mlp", 1), ("resid", 1)))
    values = {}
    for kind, window in inputs["kinds"]:
        t = kvmem.causal_trace(model, fact, kind=kind, window=window, samples=TRACE_SAMPLES, seed=SEED)
        values[f"{kind}.scores"] = t.scores
        values[f"{kind}.p_clean"] = t.p_clean
        values[f"{kind}.p_corrupt"] = t.p_corrupt
        values[f"{kind}.noise"] = t.noise
        values[f"{kind}.answer_id"] = t.answer_id
    values["noise_level"] = kvmem.noise_level(model, [fact])
    return inputs, values


def ig_factworld(model, w) -> tuple[dict, dict]:
    """(b) integrated gradients of p(target | prompt) for the same fact, all 4 layers, IG_STEPS
    steps, default rule ("auto" = midpoint here), zero baseline, site "post"."""
    fact = world_fact_as_fact(w.facts("train")[TRACE_FACT_INDEX])
    inputs = dict(fact=fact_inputs(fact), steps=IG_STEPS, layers=None, rule="auto")
    a = kvmem.integrated_gradients(model, fact, steps=IG_STEPS)
    values = dict(scores=a.scores, activations=a.activations, baseline_probs=a.baseline_probs,
                  prob=a.prob, layers=torch.tensor(a.layers), rule=a.rule)
    return inputs, values


def factworld_stats(model, w):
    """Second moment C of layer STATS_LAYER's keys over STATS_N_TOKENS tokens of the factworld
    corpus (never cached on disk: always recomputed)."""
    return kvmem.second_moment(model, STATS_LAYER, factworld_corpus(w), n_tokens=STATS_N_TOKENS,
                               use_cache=False, progress=False)


def stats_values(stats) -> dict:
    C = stats.C
    return {"C.sha256": sha256(C), "C.diag": C.diagonal().clone(), "C.row0": C[0].clone(),
            "n_tokens": stats.n_tokens, "eigmin": stats.eigmin, "eigmax": stats.eigmax,
            "tokens_seen": stats.tokens_seen, "rel_change": stats.rel_change,
            "corpus_fingerprint": stats.corpus_fingerprint}


def rome_factworld(model, w, stats) -> tuple[dict, dict]:
    """(c) the ROME edit of the first CounterFact record's request at layer STATS_LAYER, with the
    factworld C; saves the edit's tensors (u, Λ, k*, v*, loss trace) and ΔW_out's hash."""
    req = factworld_records(w)[0].request
    hp = rome_hparams()
    inputs = dict(fact=fact_inputs(req), layer=STATS_LAYER, n_tokens=STATS_N_TOKENS, prefixes=ROME_PREFIXES)
    edit = kvmem.compute_rome_edit(model, req, stats=stats, hparams=hp)
    values = {"layer": edit.layer, "u": edit.u, "lam": edit.lam, "k_star": edit.k_star, "v_star": edit.v_star,
              "loss_trace": edit.loss_trace, "delta.sha256": sha256(edit.delta())}
    values.update({f"stats.{k}": v for k, v in stats_values(stats).items()})
    return inputs, values


COUNTERFACT_COLUMNS = ("ES", "EM", "PS", "PM", "NS", "NM", "GE", "final_p_target", "v_steps", "layer")


def counterfact_factworld(model, w, stats) -> tuple[dict, dict]:
    """(d) CounterFact metrics of the unedited model and of each record's ROME edit (layer
    STATS_LAYER, same C and hparams), with a GEN_TOKENS-token generation-entropy sample (seed SEED)."""
    records = factworld_records(w)
    inputs = dict(facts=tuple(fact_inputs(r.request) for r in records), layer=STATS_LAYER,
                  n_tokens=STATS_N_TOKENS, prefixes=ROME_PREFIXES, gen_tokens=GEN_TOKENS, seed=SEED)
    ev = kvmem.evaluate_counterfact(model, records, stats=stats, hparams=rome_hparams(), gen_tokens=GEN_TOKENS,
                                    seed=SEED, progress=False)
    frame = ev.to_frame()
    rows = tuple((int(r["case_id"]), str(r["condition"])) for _, r in frame.iterrows())
    errors = tuple(None if r.get("error") is None or r.get("error") != r.get("error") else str(r["error"])
                   for _, r in frame.iterrows())
    metrics = torch.tensor(
        [[float(r[c]) if c in frame and r[c] is not None else float("nan") for c in COUNTERFACT_COLUMNS]
         for _, r in frame.iterrows()],
        dtype=torch.float64,
    )
    return inputs, {"rows": rows, "columns": COUNTERFACT_COLUMNS, "metrics": metrics, "errors": errors}


def trace_gemma(model) -> tuple[dict, dict]:
    """(e) one column of Gemma-3-270m's MLP trace (window GEMMA_WINDOW) at the subject's last
    token, GEMMA_SAMPLES samples, default noise."""
    fact = kvmem.Fact(**GEMMA_FACT)
    inputs = dict(fact=fact_inputs(fact), kind=GEMMA_KIND, window=GEMMA_WINDOW, samples=GEMMA_SAMPLES,
                  seed=SEED, positions="subject_last")
    t = kvmem.causal_trace(model, fact, kind=GEMMA_KIND, window=GEMMA_WINDOW, samples=GEMMA_SAMPLES,
                           seed=SEED, positions="subject_last")
    col = t.subject.last
    values = {"column": t.scores[:, col].clone(), "position": col, "n_pos": int(t.scores.shape[1]),
              "p_clean": t.p_clean, "p_corrupt": t.p_corrupt, "noise": t.noise, "answer_id": t.answer_id,
              "other_cells_nan": bool(t.scores[:, [i for i in range(t.scores.shape[1]) if i != col]].isnan().all())}
    return inputs, values


# --- files --------------------------------------------------------------------------------------

FILES = {
    "trace_factworld": "trace_factworld.pt",
    "ig_factworld": "ig_factworld.pt",
    "rome_factworld": "rome_factworld.pt",
    "counterfact_factworld": "counterfact_factworld.pt",
    "trace_gemma": "trace_gemma.pt",
}


def kernel_signature() -> dict:
    """What decides the last bits of this machine's float computations: the torch version, the CPU
    code path torch picked, and a digest of a probe run through the kinds of kernels the cases use
    (float32 matrix products of several shapes, batched products, layer norm, softmax, GELU, exp and
    log, a backward pass; float64 solve, Cholesky and eigh). Two machines with equal signatures are
    expected to give the cases' bits exactly; a different signature (another CPU, another torch)
    means other kernels, where the last bits may move (tests/test_golden.py then compares within a
    tolerance). Measured on one thread, as the cases."""
    g = torch.Generator().manual_seed(SEED)
    r = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    x = r(7, 512).requires_grad_(True)
    w_in, w_out = r(512, 2048) / 20, r(2048, 512) / 40
    hidden = torch.nn.functional.gelu(x @ w_in, approximate="tanh")
    out = torch.nn.functional.layer_norm(hidden @ w_out + x, (512,))
    q, k = r(4, 7, 64), r(4, 7, 64)
    attn = torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1)
    logits = out @ r(512, 1000)
    loss = torch.log_softmax(logits, -1)[:, 3].sum() + attn.exp().log1p().sum() + (r(1, 64) @ r(64, 64)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    a = r(64, 64, dtype=torch.float64)
    spd = a @ a.T + torch.eye(64, dtype=torch.float64)
    probe = [out, attn, logits, grad, torch.linalg.solve(spd, a), torch.linalg.cholesky(spd),
             torch.linalg.eigh(spd).eigenvalues, r(100_000).sum().reshape(1)]
    h = hashlib.sha256()
    for t in probe:
        h.update(sha256(t).encode())
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends.cpu, "get_cpu_capability") else "?"
    return {"torch": str(torch.__version__), "cpu_capability": capability, "probe.sha256": h.hexdigest()}


def save(name: str, inputs: dict, values: dict) -> Path:
    path = GOLDEN_DIR / FILES[name]
    torch.save({"inputs": inputs, "values": values, "kernels": kernel_signature()}, path)
    return path


def load(name: str) -> dict:
    return torch.load(GOLDEN_DIR / FILES[name], weights_only=True)
