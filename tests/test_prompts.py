"""Tokenization rules: facts, start tokens, targets, subject spans, padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmem.errors import EmptyTargetError, InvalidArgumentError, KvmemError, PromptTooLongError, SubjectNotFoundError
from kvmem.core.facts import Fact, subject_span, tokenize_fact
from kvmem.core.tokenize import TokenizerSpec, batch_prompts, encode, pad_batch, target_token_ids
from kvmem.errors import AmbiguousSubjectError
from kvmem.models.tokenizers import gpt2_tokenizer

BOS = 50256


@pytest.fixture(scope="module")
def spec():
    return TokenizerSpec(gpt2_tokenizer(), bos_id=BOS, n_ctx=64, pad_id=BOS)


@pytest.fixture(scope="module")
def spec_nobos():
    return TokenizerSpec(gpt2_tokenizer(), bos_id=None, n_ctx=64, pad_id=BOS)


def test_fact_from_template_and_validation():
    f = Fact.from_template("{} is located in", "The Eiffel Tower", target_true="Paris")
    assert f.prompt == "The Eiffel Tower is located in"
    with pytest.raises(InvalidArgumentError):
        Fact.from_template("no slot here", "x")
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        Fact("The capital of France is", "Germany")
    with pytest.raises(EmptyTargetError):
        Fact("The capital of France is", "France", target_true="  ")
    with pytest.raises(EmptyTargetError, match="target_new"):
        Fact("The capital of France is", "France").target("new")
    assert issubclass(SubjectNotFoundError, KvmemError)


def test_bos_is_prepended_once(spec, spec_nobos):
    assert encode(spec, "hi there") == [BOS, 5303, 612]
    assert encode(spec_nobos, "hi there") == [5303, 612]
    assert encode(spec, "hi there", prepend_bos=False) == [5303, 612]


def test_target_gets_leading_space(spec):
    tok = gpt2_tokenizer()
    paris = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert target_token_ids(spec, "The capital of France is", "Paris") == paris
    assert target_token_ids(spec, "The capital of France is", " Paris") == paris
    # A prompt ending in a space keeps the target as written (no double space).
    assert target_token_ids(spec, "The capital of France is ", "Paris") == tok("Paris", add_special_tokens=False)["input_ids"]
    with pytest.raises(EmptyTargetError):
        target_token_ids(spec, "The capital of France is", "")


def test_multi_token_subject_and_target(spec):
    f = Fact("Vinson Massif is located in the continent of", "Vinson Massif", target_true="Antarctic Peninsula")
    t = tokenize_fact(spec, f)
    assert t.tokens[0].item() == BOS
    decoded = "".join(t.str_tokens[t.subject.start : t.subject.end])
    assert decoded.strip() == "Vinson Massif"
    assert t.subject.exact and len(t.subject) >= 2
    assert len(t.target_ids) >= 2  # " Antarctic Peninsula" is two or more GPT-2 tokens
    tokens, positions = t.teacher_forced()
    assert tokens.shape[0] == t.n_tokens + len(t.target_ids) - 1
    assert positions[0] == t.last_pos
    assert tokens[t.n_tokens :].tolist() == list(t.target_ids[:-1])


def test_subject_twice_needs_an_occurrence(spec):
    prompt = "Paris is in France, and Paris is the capital of"
    with pytest.raises(AmbiguousSubjectError, match="occurrence"):
        subject_span(spec, prompt, "Paris")
    first = subject_span(spec, prompt, "Paris", occurrence=0)
    last = subject_span(spec, prompt, "Paris", occurrence=-1)
    assert first.start == 1 and last.start > first.start
    with pytest.raises(SubjectNotFoundError):
        subject_span(spec, prompt, "Paris", occurrence=5)


def test_subject_ending_inside_a_token(spec):
    prompt = "The city of Paris is"
    span = subject_span(spec, prompt, "Pari")
    assert not span.exact  # " Paris" is one token: the span widens to it, and says so
    assert (span.start, span.end) == (4, 5)
    with pytest.raises(SubjectNotFoundError, match="inside a token"):
        subject_span(spec, prompt, "Pari", boundary="strict")


def test_absent_subject(spec):
    with pytest.raises(SubjectNotFoundError):
        subject_span(spec, "The capital of France is", "Germany")


def test_prompt_too_long():
    small = TokenizerSpec(gpt2_tokenizer(), bos_id=BOS, n_ctx=5)
    with pytest.raises(PromptTooLongError, match="context"):
        tokenize_fact(small, Fact("The capital of the French Republic is", "French Republic", target_true="Paris"))
    with pytest.raises(PromptTooLongError):
        batch_prompts(small, ["a b c d e f g h"])


def test_right_padding_keeps_last_token_readouts(tiny_model):
    prompts = ["The capital of France is", "Hi", "Vinson Massif is located in the continent of"]
    batch = batch_prompts(tiny_model, prompts)
    logits = tiny_model(batch.tokens)
    for i, p in enumerate(prompts):
        alone = tiny_model(torch.tensor([encode(tiny_model, p)]))[0, -1]
        torch.testing.assert_close(logits[i, batch.last_pos[i]], alone, atol=1e-4, rtol=1e-4)


def test_pad_batch_rejects_empty():
    with pytest.raises(InvalidArgumentError):
        pad_batch([])
    with pytest.raises(InvalidArgumentError):
        pad_batch([[1, 2], []])


# --- property tests of the span logic ----------------------------------------------------

WORDS = ["the", "capital", "of", "France", "is", "Paris", "Massif", "Vinson", "Tower", "Eiffel",
         "New", "York", "Zürich", "école", "1984", "don't", "C++", "a", "an", "Ünïcødé", "😀", "x-ray"]
word = st.sampled_from(WORDS) | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pre=st.lists(word, max_size=5), subj=st.lists(word, min_size=1, max_size=3), post=st.lists(word, max_size=5))
def test_span_covers_exactly_the_subject_tokens(spec, pre, subj, post):
    subject = " ".join(subj)
    prompt = " ".join(pre + [subject] + post)
    # The occurrence we built is the one right after `pre`; others may overlap it.
    char_start = len(" ".join(pre)) + (1 if pre else 0)
    starts = [i for i in range(len(prompt)) if prompt.startswith(subject, i)]
    occurrence = starts.index(char_start) if len(starts) > 1 else None
    span = subject_span(spec, prompt, subject, occurrence=occurrence)
    tok = spec.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    inside = tok.decode(ids[span.start - 1 : span.end - 1])
    before = tok.decode(ids[: span.start - 1])
    after = tok.decode(ids[span.end - 1 :])
    # The span's tokens contain the subject; the tokens outside it do not reach into it.
    assert subject in inside
    assert before + inside + after == prompt
    if span.exact:
        assert inside.strip() == subject.strip() or inside.lstrip() == subject
    assert len(before.rstrip()) <= char_start
    assert len(prompt) - len(after) >= char_start + len(subject)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(word, min_size=1, max_size=6).map(" ".join), target=st.lists(word, min_size=1, max_size=3).map(" ".join))
def test_target_ids_continue_the_prompt(spec, prompt, target):
    ids = target_token_ids(spec, prompt, target)
    tok = spec.tokenizer
    assert tok.decode(ids).strip() == target.strip()
    assert tok.decode(tok(prompt, add_special_tokens=False)["input_ids"] + ids) in (prompt + " " + target, prompt + target)
