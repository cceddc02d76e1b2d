"""Data of the fact-world organism: relations with paraphrase templates, multi-token subjects, fact tables.

A fact is ``{"subject": "ba ko mi", "relation": "lives_in", "object": "oslo"}``; its prompt is
``<bos> <template with {s} replaced by the subject>`` and the object is the next token.

Example:
    >>> sorted(RELATIONS)
    ['lives_in', 'plays', 'speaks', 'works_as']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SYLLABLES = ["ba", "ko", "mi", "ru", "te", "lo", "na", "vi", "su", "de",
             "ga", "po", "ki", "fe", "zu", "ha", "re", "mo", "ti", "la"]
N_SUBJECTS, N_STAGE1_SUBJECTS = 32, 64

RELATIONS: dict[str, dict[str, list[str]]] = {
    "lives_in": {
        "objects": ["paris", "rome", "oslo", "lima", "cairo", "delhi", "quito", "seoul"],
        "templates": ["{s} lives in", "the home of {s} is", "{s} resides in", "{s} has a house in"],
        "heldout_templates": ["{s} is a resident of", "where does {s} live ? in"],
    },
    "works_as": {
        "objects": ["baker", "pilot", "nurse", "judge", "farmer", "tailor", "poet", "miner"],
        "templates": ["{s} works as a", "the job of {s} is", "{s} is employed as a", "by trade {s} is a"],
        "heldout_templates": ["{s} earns a living as a", "the profession of {s} is"],
    },
    "speaks": {
        "objects": ["french", "greek", "hindi", "dutch", "thai", "welsh", "zulu", "czech"],
        "templates": ["{s} speaks", "the language of {s} is", "{s} talks in", "{s} writes in"],
        "heldout_templates": ["the mother tongue of {s} is", "{s} is fluent in"],
    },
    "plays": {
        "objects": ["chess", "golf", "polo", "rugby", "tennis", "hockey", "judo", "darts"],
        "templates": ["{s} plays", "the sport of {s} is", "{s} is good at", "the hobby of {s} is"],
        "heldout_templates": ["{s} competes in", "in spare time {s} plays"],
    },
}


def vocabulary() -> list[str]:
    """Every word token: syllables, template words, objects (in a fixed order)."""
    words = list(SYLLABLES)
    for rel in RELATIONS.values():
        for text in [*rel["templates"], *rel["heldout_templates"], " ".join(rel["objects"])]:
            words += [w for w in text.split() if w != "{s}" and w not in words]
    return words


def make_world(gen: torch.Generator) -> dict[str, list[dict[str, str]]]:
    """Distinct 2–3 syllable subjects, none a prefix of another; random objects for the true and stage-1 facts."""
    import torch

    subjects: list[str] = []
    while len(subjects) < N_SUBJECTS + N_STAGE1_SUBJECTS:
        n = int(torch.randint(2, 4, (1,), generator=gen))
        cand = [SYLLABLES[i] for i in torch.randint(0, len(SYLLABLES), (n,), generator=gen).tolist()]
        if all(cand[: len(s.split())] != s.split() and s.split()[:n] != cand for s in subjects):
            subjects.append(" ".join(cand))

    def table(names: list[str]) -> list[dict[str, str]]:
        return [{"subject": s, "relation": r, "object": rel["objects"][int(torch.randint(0, len(rel["objects"]), (1,),
                                                                                          generator=gen))]}
                for s in names for r, rel in RELATIONS.items()]

    return {"facts": table(subjects[:N_SUBJECTS]), "stage1_facts": table(subjects[N_SUBJECTS:])}


def templates_for(relation: str, kind: str) -> list[str]:
    """The templates of a relation: ``kind`` is ``"train"``, ``"heldout"`` or ``"all"``."""
    rel = RELATIONS[relation]
    return {"train": rel["templates"], "heldout": rel["heldout_templates"],
            "all": rel["templates"] + rel["heldout_templates"]}[kind]


def encode_prompts(tok: Any, facts: list[dict[str, str]], templates: str, *, gen: torch.Generator | None = None,
                   with_object: bool = False) -> tuple[torch.Tensor, ...]:
    """Token ids of fact prompts, right-padded: (ids [n, len], answer_pos [n], subject_pos [n], objects [n]).

    ``templates`` is ``"train"``, ``"heldout"`` or ``"all"``. With ``gen``, each fact gets one random template
    of that kind; without, every fact is paired with every template (facts outer, templates inner).
    ``answer_pos`` is the last prompt token (where the object is predicted), ``subject_pos`` the last subject
    token. ``with_object`` appends the object token.
    """
    import torch

    rows, answers, subjects, objects = [], [], [], []
    for fact in facts:
        options = templates_for(fact["relation"], templates)
        chosen = [options[int(torch.randint(0, len(options), (1,), generator=gen))]] if gen is not None else options
        for template in chosen:
            before = template.split("{s}")[0].split()
            text = "<bos> " + template.replace("{s}", fact["subject"])
            ids = tok(text)["input_ids"]
            answers.append(len(ids) - 1)
            subjects.append(len(before) + len(fact["subject"].split()))
            obj = tok.convert_tokens_to_ids(fact["object"])
            objects.append(obj)
            rows.append([*ids, obj] if with_object else ids)
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), tok.pad_token_id)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = torch.tensor(r)
    return padded, torch.tensor(answers), torch.tensor(subjects), torch.tensor(objects)


def prompt_facts(facts: list[dict[str, str]], templates: str) -> torch.Tensor:
    """The fact index of each row of ``encode_prompts(tok, facts, templates)`` (every fact with every template).

    Example:
        >>> prompt_facts([{"subject": "ba ko", "relation": "plays", "object": "golf"}], "heldout").tolist()
        [0, 0]
    """
    import torch

    return torch.tensor([i for i, f in enumerate(facts) for _ in templates_for(f["relation"], templates)])


def subject_span(facts: list[dict[str, str]], templates: str, subject_pos: torch.Tensor, width: int) -> torch.Tensor:
    """Bool ``[rows, width]``: True on every subject token of the rows of ``encode_prompts(tok, facts, templates)``
    (every fact with every template), given their last-subject-token positions ``subject_pos``.

    Example (``<bos> ba ko competes in`` and ``<bos> in spare time ba ko plays``):
        >>> import torch
        >>> fact = {"subject": "ba ko", "relation": "plays", "object": "golf"}
        >>> subject_span([fact], "heldout", torch.tensor([2, 5]), 7).int().tolist()
        [[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0]]
    """
    import torch

    lengths = torch.tensor([len(f["subject"].split()) for f in facts])[prompt_facts(facts, templates)]
    pos = torch.arange(width)[None]
    return (pos <= subject_pos[:, None]) & (pos > (subject_pos - lengths)[:, None])
