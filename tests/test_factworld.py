"""The embedded factworld model: world generation, shipped weights, exact export, accuracy, cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvmem.core.backend import installed_backend
from kvmem.errors import CacheError, InvalidArgumentError
from kvmem.factworld import (
    WEIGHTS_DIR,
    WorldFact,
    build_world,
    evaluate_accuracy,
    factworld_hf_folder,
    factworld_hooked_transformer,
    factworld_tokenizer,
    load_compact,
    factworld_model,
    load_factworld_hf,
    subject_token_span,
)
from kvmem.factworld.export import verify_hf_folder


@pytest.fixture(scope="module")
def tok():
    return factworld_tokenizer()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kvmem-cache")


@pytest.fixture(scope="module")
def hf(cache_dir):
    return load_factworld_hf(cache_dir)


# ---- world ------------------------------------------------------------------------------------


def test_world_is_deterministic_and_big_enough(world, tok):
    again = build_world(world.seed, len(world.subjects))
    assert again.subjects == world.subjects and again.objects == world.objects
    other = build_world(world.seed + 1, len(world.subjects))
    assert other.subjects != world.subjects
    assert len(world.subjects) >= 300
    assert len(world.relations) >= 6
    for rel in world.relations:
        assert 10 <= len(rel.objects) <= 40
        assert len(rel.train_templates) >= 4 and len(rel.paraphrase_templates) >= 2
    assert any("{} is a" in r.train_templates for r in world.relations)
    world.validate(tok)  # single-token objects, no template prefixes, clean subject names


def test_facts_and_prompts(world):
    facts = world.facts("train")
    assert len(facts) == len(world.subjects) * len(world.relations)
    f = facts[0]
    assert isinstance(f, WorldFact)
    assert f.prompt == f.template.replace("{}", f.subject) and f.subject in f.prompt
    assert f.target.startswith(" ") and f.target == world.object_of(f.subject, f.relation)
    para = world.prompts_for(f, "paraphrase")
    rel = world.relation(f.relation)
    assert [p.template for p in para] == list(rel.paraphrase_templates)
    assert not set(rel.paraphrase_templates) & set(rel.train_templates)
    assert all(p.target == f.target for p in para)


def test_counterfact_records_follow_the_documented_rule(world):
    from kvmem.factworld import counterfact_records

    facts = world.facts("train")
    records = counterfact_records(world)
    assert len(records) == len(facts) and counterfact_records(world, n=7) == records[:7]
    for i in (0, 1, 500, len(facts) - 1):
        r, f = records[i], facts[i]
        objects = world.relation(f.relation).objects
        assert r.case_id == i and r.template == f.template and r.subject == f.subject
        assert r.request.prompt == f.prompt and r.request.target_true == f.target
        assert r.request.target_new == objects[(objects.index(f.target) + 1) % len(objects)] != f.target
        assert r.paraphrase_prompts == tuple(p.prompt for p in world.prompts_for(f, "paraphrase"))
        assert r.neighborhood_prompts == tuple(n.prompt for n in world.neighbours(f, k=5, same_object=True))
        assert r.attribute_prompts == () and r.generation_prompts == ()
    assert len(counterfact_records(world, n=3, n_neighbours=2)[0].neighborhood_prompts) == 2
    assert counterfact_records(n=2) == records[:2]  # the shipped world by default
    with pytest.raises(InvalidArgumentError):
        counterfact_records(world, n_neighbours=-1)


def test_seeded_counterfact_records_sample_facts_and_new_objects(world):
    """seed=s: the facts shuffled by random.Random(s) and each new object drawn by it in turn (the
    rule the committed factworld editing and diagnose benchmarks used), written out plainly."""
    import random

    from kvmem.factworld import counterfact_records

    facts = world.facts("train")
    rng = random.Random(3)
    rng.shuffle(facts)
    expected = [(f.prompt, rng.choice([o for o in world.relation(f.relation).objects if o != f.target])) for f in facts[:20]]
    records = counterfact_records(world, n=20, n_neighbours=10, seed=3)
    assert [(r.request.prompt, r.request.target_new) for r in records] == expected
    assert [r.case_id for r in records] == list(range(20))
    assert counterfact_records(world, n=20, seed=3) != counterfact_records(world, n=20, seed=4)


def test_counterfact_records_round_trip_as_json(world, tmp_path):
    import json

    from kvmem.data import load_counterfact
    from kvmem.factworld import counterfact_records

    records = counterfact_records(world, n=5)
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([r.to_json() for r in records]))
    back = load_counterfact(path)
    assert [dataclasses.replace(r, file_index=None) for r in back] == records


def test_corpus_is_the_training_text_shuffled(world):
    from kvmem.factworld import corpus

    text = corpus(world)
    train = [world.sentence(p.subject, p.relation, p.template) for p in world.all_prompts("train")]
    assert sorted(text) == sorted(train) and text != train  # every training sentence, once, reordered
    assert corpus() == text  # the shipped world; the same order on every call
    assert text[0].endswith(".") and any(f.subject in text[0] for f in world.facts("train"))


def test_neighbours_share_relation_and_object(world):
    f = world.facts("train")[5]
    ns = world.neighbours(f, k=5)
    assert len(ns) == 5
    for n in ns:
        assert n.subject != f.subject and n.relation == f.relation
        assert n.target == f.target and n.template == f.template
    others = world.neighbours(f, k=5, same_object=False)
    assert all(n.target != f.target for n in others)


def test_subject_token_spans(world, tok):
    for s in world.subjects:
        spaced = tok.encode(" " + s, add_special_tokens=False)
        bare = tok.encode(s, add_special_tokens=False)
        assert 2 <= len(spaced) <= 4
        assert spaced[1:] == bare[1:]  # same last token at sentence start and mid-sentence
    templates = {t for r in world.relations for t in r.train_templates + r.paraphrase_templates}
    for i, s in enumerate(world.subjects[::8]):
        for t in templates:
            prompt = t.replace("{}", s)
            a, b = subject_token_span(prompt, s, tok)
            ids = tok.encode(prompt, add_special_tokens=False)
            assert tok.decode(ids[a:b]).strip() == s


# ---- shipped model ----------------------------------------------------------------------------


def test_shipped_weights_are_small():
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir())
    assert size < 8_000_000


def test_shipped_model_loads_as_gpt2(hf, tok):
    from transformers import GPT2LMHeadModel

    model, htok = hf
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.vocab_size == 50257
    assert model.get_output_embeddings().weight.shape[0] == 50257
    assert htok.encode(" Paris") == tok.encode(" Paris")
    assert htok.bos_token_id == 50256


def test_export_is_exact(hf, world, tok):
    model, _ = hf
    compact, used, _ = load_compact()
    prompts = [p.prompt for p in world.all_prompts("paraphrase")[:: 97]]
    enc = [[50256] + tok.encode(p, add_special_tokens=False) for p in prompts]
    width = max(map(len, enc))
    full_ids = torch.tensor([e + [50256] * (width - len(e)) for e in enc])
    remap = torch.full((50257,), -1, dtype=torch.long)
    remap[torch.tensor(used)] = torch.arange(len(used))
    with torch.no_grad():
        full = model(full_ids).logits
        small = compact(remap[full_ids]).logits
    torch.testing.assert_close(full[..., torch.tensor(used)], small, atol=1e-5, rtol=1e-5)
    unused = torch.ones(50257, dtype=torch.bool)
    unused[torch.tensor(used)] = False
    assert torch.all(full[..., unused] == 0)


def test_accuracy_of_shipped_model(hf, world, tok):
    model, _ = hf
    train = evaluate_accuracy(model, world, "train", tokenizer=tok, max_prompts=1200)
    para = evaluate_accuracy(model, world, "paraphrase", tokenizer=tok, max_prompts=1200)
    assert train >= 0.95, train
    assert para >= 0.80, para


def test_transformer_lens_model_matches_hf(hf, cache_dir, world, tok):
    """The installed TransformerLens's model (HookedTransformer or TransformerBridge) equals HF's."""
    from kvmem.core.backend import backend_of, installed_backend

    model, _ = hf
    ht = factworld_model(cache_dir=cache_dir)
    assert backend_of(ht) == installed_backend() and ht.cfg.d_vocab == 50257
    assert ht.cfg.default_prepend_bos and ht.tokenizer is not None
    f = world.facts("train")[3]
    tokens = ht.to_tokens(f.prompt)
    assert tokens[0, 0].item() == 50256
    assert tokens[0, 1:].tolist() == tok.encode(f.prompt, add_special_tokens=False)
    with torch.no_grad():
        lp_ht = ht(tokens).log_softmax(-1)
        lp_hf = model(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(lp_ht, lp_hf, atol=1e-4, rtol=0)
    assert ht.to_single_token(f.target) == lp_ht[0, -1].argmax().item()
    # and it is as accurate as the HF model on a sample
    assert evaluate_accuracy(ht, world, "paraphrase", tokenizer=tok, max_prompts=200) >= 0.8


@pytest.mark.skipif(installed_backend() != "hooked", reason="HookedTransformer exists only in "
                    "TransformerLens 3.x; test_transformer_lens_model_matches_hf covers the bridge")
def test_hooked_transformer_is_a_hooked_transformer(cache_dir):
    from transformer_lens import HookedTransformer

    ht = factworld_hooked_transformer(cache_dir=cache_dir, center_unembed=False)
    assert isinstance(ht, HookedTransformer) and ht.cfg.model_name == "factworld"


@pytest.mark.skipif(installed_backend() != "bridge", reason="TransformerLens 3.x has HookedTransformer: "
                    "nothing to refuse (test_hooked_transformer_is_a_hooked_transformer loads it)")
def test_hooked_transformer_on_transformer_lens_4_points_to_load_model():
    from kvmem.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"factworld_model\(\)"):
        factworld_hooked_transformer()


# ---- cache ------------------------------------------------------------------------------------


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path):
    folder = factworld_hf_folder(tmp_path)
    assert folder.parent == tmp_path
    verify_hf_folder(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheError):
        verify_hf_folder(folder)
    with pytest.raises(CacheError):
        factworld_hf_folder(tmp_path, on_corrupt="raise")
    again = factworld_hf_folder(tmp_path)  # default: rebuilt
    assert again == folder
    verify_hf_folder(again)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMEM_CACHE", str(tmp_path))
    folder = factworld_hf_folder()
    assert folder.parent == tmp_path / "factworld"


def test_recall_goes_through_the_last_subject_token(world, cache_dir, tok):
    """ROME-style recall: with the subject's embeddings corrupted, restoring the clean residual
    at the subject's LAST token (after layer 1) brings back much of the answer; restoring its
    first token does not (the model was trained with the subject funnel, see train.py)."""
    ht = factworld_model(cache_dir=cache_dir)
    g = torch.Generator().manual_seed(0)
    sub_ids = sorted({t for s in world.subjects for t in tok.encode(" " + s)})
    sigma = 3 * ht.W_E[torch.tensor(sub_ids)].std().item()
    hook = "blocks.1.hook_resid_post"
    gains = {"last": [], "first": []}
    for f in world.facts("train")[::331][:8]:
        toks = ht.to_tokens(f.prompt)
        a, b = subject_token_span(f.prompt, f.subject, tok)
        a, b = a + 1, b + 1  # BOS
        target = ht.to_single_token(f.target)
        noise = torch.randn(8, b - a, ht.cfg.d_model, generator=g) * sigma

        def corrupt(x, hook):
            x[:, a:b] = x[:, a:b] + noise
            return x

        with torch.no_grad():
            clean_logits, cache = ht.run_with_cache(toks)
            p_clean = clean_logits.softmax(-1)[0, -1, target].item()
            batch = toks.repeat(8, 1)
            p_cor = ht.run_with_hooks(batch, fwd_hooks=[("hook_embed", corrupt)]).softmax(-1)[:, -1, target].mean().item()
            for name, pos in (("last", b - 1), ("first", a)):
                def restore(x, hook, pos=pos):
                    x[:, pos] = cache[hook.name][0, pos]
                    return x

                out = ht.run_with_hooks(batch, fwd_hooks=[("hook_embed", corrupt), (hook, restore)])
                p = out.softmax(-1)[:, -1, target].mean().item()
                gains[name].append((p - p_cor) / max(p_clean - p_cor, 1e-6))
    last, first = sum(gains["last"]) / 8, sum(gains["first"]) / 8
    assert last > 0.4 and last > first + 0.3, (last, first)


def test_phantom_loss_equals_full_vocabulary_cross_entropy():
    from kvmem.factworld.train import phantom_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    targets = torch.randint(0, 5, (2, 3), generator=g)
    full = torch.cat([logits, torch.zeros(2, 3, 7)], dim=-1)
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, 12), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(phantom_nll(logits, targets, 7).reshape(-1), expected)


def test_training_script_round_trip(tmp_path):
    """A few steps of a tiny model: the script runs, writes compact weights that load and
    expand to a full Hugging Face folder."""
    from kvmem.factworld.train import TrainConfig, train

    cfg = TrainConfig(n_subjects=20, n_layer=1, n_embd=32, n_head=2, n_inner=64, steps=3,
                      packed_batch=2, single_batch=2, eval_every=100, eval_prompts=10)
    model, used, log = train(cfg, tmp_path / "w", log=lambda *_: None)
    compact, used2, config = load_compact(tmp_path / "w")
    assert used2 == used and config["world"] == {"seed": 0, "n_subjects": 20}
    folder = factworld_hf_folder(tmp_path / "cache", weights_dir=tmp_path / "w")
    verify_hf_folder(folder)
    assert (tmp_path / "w" / "train_log.json").exists() and 0 <= log["accuracy"]["train"] <= 1
