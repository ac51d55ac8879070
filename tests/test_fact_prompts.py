"""The demo's own paraphrases and neighbours (kvmem.pipelines.fact_prompts), checked on factworld,
whose facts are known: a built neighbour must be answered like the fact (checked by a plain
forward pass), and the subjects the world holds to the same object must be among those found."""

from __future__ import annotations

import torch

from kvmem.core.facts import Fact
from kvmem.pipelines.fact_prompts import neighbour_prompts, paraphrase_prompts


def _top1(model, prompt: str) -> str:
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    return model.tokenizer.decode([int(logits.argmax())])


def test_neighbours_are_answered_like_the_fact(factworld):
    from kvmem.factworld import shipped_world

    world = shipped_world()
    wf = world.facts("train")[0]
    fact = Fact(wf.prompt, wf.subject, target_true=wf.target_true)
    same = set(world.subjects_with(wf.relation_id, wf.target_true)) - {wf.subject}
    others = sorted({f.subject for f in world.facts("train")} - same - {wf.subject})[:30]
    subjects = sorted(same) + others
    found = neighbour_prompts(factworld, fact, candidates=subjects, n=len(subjects))
    assert found, "the world holds other subjects to this object"
    template = fact.prompt.replace(fact.subject, "{}", 1)
    for prompt in found:
        assert _top1(factworld, prompt).strip() == fact.target_true.split()[0]
    # the trained model answers its training facts: every same-object subject is found
    assert {template.format(s) for s in same} <= set(found)
    assert len(neighbour_prompts(factworld, fact, candidates=subjects, n=2)) == 2


def test_paraphrases_put_model_text_before_the_prompt(factworld):
    from kvmem.factworld import shipped_world

    wf = shipped_world().facts("train")[0]
    fact = Fact(wf.prompt, wf.subject, target_true=wf.target_true)
    a = paraphrase_prompts(factworld, fact, n=2, seed=3)
    assert a == paraphrase_prompts(factworld, fact, n=2, seed=3)  # seeded
    assert all(p.endswith(". " + fact.prompt) and len(p) > len(fact.prompt) + 2 for p in a)
