"""Private helpers shared by the two_languages, binary_attribute and refusal_gate organisms.

Batching of word sequences, per-document negative log-likelihood, seeded sampling through any forward function
(so that ``lsi`` interventions apply) and continuations through ``lm.generate`` as words. Verification goes
through these, not through any graded locate or steer method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lsi.core.model import LanguageModel

ForwardFn = Callable[["torch.Tensor"], "torch.Tensor"]  # ids [b, p] -> logits [b, p, vocab]


def encode(vocab: dict[str, int], words: Sequence[str]) -> list[int]:
    """Word list -> ids (every word must be in the vocabulary)."""
    return [vocab[w] for w in words]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to one tensor; returns ``(ids [b, p], mask [b, p])`` with mask True on real tokens."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def mean_nll(forward: ForwardFn, seqs: Sequence[Sequence[int]], pad_id: int, *, batch: int = 256) -> float:
    """Mean next-token NLL over all target tokens of right-padded ``seqs`` (targets = every token after the first)."""
    import torch

    from lsi.evaluation.functional import next_token_nll

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(seqs), batch):
            ids, mask = pad_right(seqs[start : start + batch], pad_id)
            nll = next_token_nll(forward(ids), ids)
            m = mask[:, 1:]
            total += float(nll[m].sum())
            count += int(m.sum())
    return total / max(count, 1)


def generated_words(lm: LanguageModel, prompts: Sequence[Sequence[str]], max_new_tokens: int,
                    **generate_kwargs: Any) -> list[list[str]]:
    """The continuations of word prompts through ``lm.generate`` (so an applied steering acts on them), as words,
    each cut after its first ``<eos>``."""
    tok = lm.tokenizer
    vocab = tok.get_vocab()
    seqs = [encode(vocab, p) for p in prompts]
    ids = lm.generate(seqs, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, **generate_kwargs)
    out = []
    for row in ids[:, max(len(s) for s in seqs):].tolist():  # left-padded: the prompts end at the same column
        words = tok.convert_ids_to_tokens(row)
        out.append(words[: words.index("<eos>") + 1] if "<eos>" in words else words)
    return out


def sample(
    forward: ForwardFn,
    prompts: Sequence[Sequence[int]],
    *,
    max_new: int,
    stop_id: int,
    pad_id: int,
    seed: int,
    greedy: bool = False,
    batch: int = 256,
) -> list[list[int]]:
    """Continue each prompt token by token (seeded multinomial, or argmax when ``greedy``) until ``stop_id``.

    Prompts are grouped by length so no padding enters the model. Returns only the new tokens (the stop token
    included when produced).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    with torch.no_grad():
        for length in sorted(by_len):
            group = by_len[length]
            for start in range(0, len(group), batch):
                idx = group[start : start + batch]
                ids = torch.tensor([list(prompts[i]) for i in idx], dtype=torch.long)
                done = torch.zeros(len(idx), dtype=torch.bool)
                for _ in range(max_new):
                    logits = forward(ids)[:, -1].float()
                    if greedy:
                        nxt = logits.argmax(-1)
                    else:
                        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)
                    nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                    for j, i in enumerate(idx):
                        if not done[j]:
                            out[i].append(int(nxt[j]))
                    done |= nxt == stop_id
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    if bool(done.all()):
                        break
    return out

