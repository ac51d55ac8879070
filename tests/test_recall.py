"""Batched recall equals reading each fact's full logits one at a time."""

import torch

from kvmem.data import builtin_facts
from kvmem.core.facts import tokenize_fact
from kvmem.core.readout import last_token_logits
from kvmem.recall import fact_recall


def test_recall_matches_plain_forward(tiny_model):
    facts = builtin_facts()[:7]
    res = fact_recall(tiny_model, facts, batch_size=3)
    for i, f in enumerate(facts):
        t = tokenize_fact(tiny_model, f)
        logits = tiny_model(t.tokens[None])[0, -1].log_softmax(-1)
        tgt = t.target_ids[0]
        assert res.ranks[i].item() == int((logits > logits[tgt]).sum())
        torch.testing.assert_close(res.probs[i], logits[tgt].exp(), atol=1e-5, rtol=1e-4)
    assert 0.0 <= res.top_k(5) <= 1.0
    assert list(res.to_frame().columns)[:2] == ["prompt", "subject"]


def test_last_token_logits_equals_full_unembed(tiny_model):
    tokens = torch.randint(0, 50000, (3, 9))
    last = torch.tensor([8, 4, 0])
    full = tiny_model(tokens)
    got = last_token_logits(tiny_model, tokens, last)
    torch.testing.assert_close(got, full[torch.arange(3), last], atol=1e-4, rtol=1e-4)


def test_shape_annotations_are_checked_at_run_time(tiny_gpt2):
    """conftest installs jaxtyping+beartype on kvmem: a wrongly shaped argument must be rejected."""
    import pytest
    from kvmem.core.readout import final_logits

    with pytest.raises(Exception, match="(?i)type|shape|dim"):
        final_logits(tiny_gpt2, torch.zeros(3))  # wants [batch, d_model]


def test_answered_facts_keeps_exactly_the_top1_answers_in_order(factworld, world):
    """On the fact-world model (which knows its training facts): a true fact it answers is kept, the
    same prompt with another object of the relation is dropped, and the order is the given one."""
    from kvmem.core.facts import Fact
    from kvmem.recall import answered_facts

    model = factworld
    true = [Fact(f.prompt, f.subject, target_true=f.target) for f in world.facts("train")[:12]]
    wrong = [Fact(f.prompt, f.subject, target_true=next(o for o in world.relation(f.relation).objects if o != f.target))
             for f in world.facts("train")[:12]]
    mixed = [f for pair in zip(wrong, true) for f in pair]
    got = answered_facts(model, mixed, batch_size=5)
    expect = []
    for f in mixed:  # one plain forward per fact
        t = tokenize_fact(model, f)
        logits = model(t.tokens[None])[0, -1]
        if int(logits.argmax()) == t.target_ids[0]:
            expect.append(f)
    assert got == expect
    assert not set(got) & set(wrong) and len(got) >= 10
