"""Paraphrase and neighbour prompts for one fact when the user gives none: what the demo needs for
CounterFact's PS and NS on a fact typed on the command line.

- Paraphrases (PS): the fact's prompt after text the model wrote itself, as ROME's CounterFact
  paraphrase prompts put generated text before the prompt. CounterFact also rewords the prompt;
  kvmem cannot reword, so these test generalization across contexts, not across wordings.
- Neighbours (NS): the fact's prompt with other subjects put in for the fact's subject, kept when
  the model's top next token is the first token of the fact's answer: the model holds them to the
  same answer, as CounterFact's neighbourhood prompts name other subjects with the same object
  (there by ground truth, here by the model's own answer). The subjects come from
  `NEIGHBOUR_SUBJECTS`, a built-in list of well-known landmarks, places, organisations and people;
  a fact none of them shares gets no neighbours, and its NS is "n/a" with that reason.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvmem.core.facts import Fact
from kvmem.core.readout import last_token_logits
from kvmem.core.tokenize import batch_prompts, spec_for, target_token_ids
from kvmem.editing.generate import sample_tokens
from kvmem.errors import InvalidArgumentError

# Well-known subjects, several per city, country and field, so that common facts find neighbours.
NEIGHBOUR_SUBJECTS = (
    # landmarks by city
    "The Louvre", "Notre-Dame Cathedral", "The Arc de Triomphe", "The Champs-Élysées", "The Musée d'Orsay",
    "The Colosseum", "The Trevi Fountain", "The Roman Forum", "The Pantheon",
    "Big Ben", "Buckingham Palace", "Tower Bridge", "The British Museum", "Westminster Abbey",
    "The Statue of Liberty", "The Empire State Building", "Central Park", "Times Square",
    "The Brandenburg Gate", "The Reichstag building", "Checkpoint Charlie",
    "The Kremlin", "Red Square", "The Sagrada Família", "Park Güell", "The Prado Museum",
    "The Acropolis", "The Parthenon", "The Hagia Sophia", "The Blue Mosque", "The Forbidden City",
    "Tiananmen Square", "The Sydney Opera House", "The Golden Gate Bridge", "Alcatraz Island",
    "The Space Needle", "The Rijksmuseum", "The Anne Frank House", "St. Mark's Basilica", "The Rialto Bridge",
    "The Taj Mahal", "Tokyo Tower", "The Burj Khalifa", "The CN Tower", "The Christ the Redeemer statue",
    # countries and cities
    "France", "Italy", "Germany", "Spain", "Japan", "China", "Russia", "Brazil", "Canada", "Egypt",
    "Paris", "Rome", "London", "Berlin", "Madrid", "Tokyo", "Moscow", "Cairo", "Toronto", "Sydney",
    # organisations
    "Google", "Microsoft", "Apple", "Toyota", "Nokia", "Samsung", "Volkswagen", "IKEA", "Sony", "BMW",
    # people
    "Albert Einstein", "Pablo Picasso", "Wolfgang Amadeus Mozart", "William Shakespeare", "Leonardo da Vinci",
    "Napoleon Bonaparte", "Isaac Newton", "Marie Curie", "Charles Darwin", "Ludwig van Beethoven",
)

# How many paraphrases, and how many tokens of model-written context before each.
N_PARAPHRASES = 2
CONTEXT_TOKENS = 12
# How many neighbours at most (CounterFact has 10 per record).
N_NEIGHBOURS = 10


@torch.no_grad()
def paraphrase_prompts(model, fact: Fact, *, n: int = N_PARAPHRASES, context_tokens: int = CONTEXT_TOKENS,
                       seed: int = 0) -> tuple[str, ...]:
    """`n` prompts of the fact, each its prompt after `context_tokens` tokens of text the model wrote
    from its start token (seeded top-5 samples, ROME's prefix sampling), ending with ". "."""
    if n < 1 or context_tokens < 1:
        raise InvalidArgumentError("Need n ≥ 1 paraphrases of ≥ 1 context token.")
    spec = spec_for(model)
    start = spec.sample_start_id
    if start is None:
        raise InvalidArgumentError("The tokenizer has no start or end-of-text token to sample context from.")
    gen = torch.Generator().manual_seed(seed)
    rows = sample_tokens(model, torch.tensor([start]), n, context_tokens, top_k=5, generator=gen)
    out = []
    for row in rows.tolist():
        text = spec.tokenizer.decode(row, skip_special_tokens=True).replace("\n", " ").strip()
        out.append(f"{text}. {fact.prompt}" if text else fact.prompt)
    return tuple(dict.fromkeys(out))


@torch.no_grad()
def neighbour_prompts(model, fact: Fact, *, candidates: Sequence[str] = NEIGHBOUR_SUBJECTS,
                      n: int = N_NEIGHBOURS, batch_size: int = 32) -> tuple[str, ...]:
    """Up to `n` prompts of the fact's template with another subject of `candidates` for which the
    model's top next token is the first token of `fact.target_true` (in `candidates`' order)."""
    if fact.target_true is None:
        raise InvalidArgumentError("Neighbours are prompts with the same answer: the fact needs target_true.")
    start = fact.prompt.find(fact.subject)
    template = fact.prompt[:start] + "{}" + fact.prompt[start + len(fact.subject):]
    others = [c for c in candidates if c.lower() != fact.subject.lower() and c.lower() not in fact.subject.lower()]
    # a subject at the start of a sentence keeps its capital; inside one, "The" becomes "the"
    prompts = [template.format(c if start == 0 or not c.startswith("The ") else "the " + c[4:]) for c in others]
    found: list[str] = []
    first = target_token_ids(model, fact.prompt, fact.target_true)[0]  # every prompt ends as the fact's does
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        batch = batch_prompts(model, chunk)
        logits = last_token_logits(model, batch.tokens.to(model.cfg.device), batch.last_pos)
        top = logits.argmax(-1).tolist()
        for prompt, t in zip(chunk, top):
            if t == first:
                found.append(prompt)
                if len(found) == n:
                    return tuple(found)
    return tuple(found)


__all__ = ["paraphrase_prompts", "neighbour_prompts", "NEIGHBOUR_SUBJECTS"]
