"""Organism ``two_languages``: one content grammar rendered in two languages with disjoint lexicons and word order.

Language A is SVO with determiners ("the big cat sees the apple ."); language B is SOV with case particles and
post-nominal adjectives ("nuru bim ga mafe wo tesa po"). The same content (subject, verb, object, optional
adjectives, selectional restrictions) underlies both. A document is ``<bos>`` + three sentences of one language +
``<eos>``.

Ground truth by training objective: in each of the two GPT-NeoX MLP layers a seeded block of neurons is reserved
for each language. A strict loss (1) makes the block fire (pre-activation ≥ 1) on its own language and stay
silent (pre-activation ≤ −5) elsewhere, (2) requires the other language's loss to be unchanged when the block is
zeroed, (3) requires the block's own language to lose at least ``margin`` nats per token when the block is zeroed,
and (4) equalizes the firing rates of every other neuron across the two languages (and keeps them below
``MAX_RATE``, so that, as in real models, no neuron fires on every token), so the reserved blocks are the only
language-specific neurons.

Activation is planted too: the blocks, not the context, decide the language of what comes next. Without it the
model reads the language from the prompt's words, and setting the A block on a B prompt breaks the text instead of
switching it. So training also runs *switch documents* (:data:`SWITCH_MIX`): one or two sentences of one language,
then the other language up to three sentences, with both blocks clamped from the switch point on (or, as a
steering acting at every position does, from ``<bos>`` on) to the new language's pattern: its block at its mean
firing value (times a level within ±``CLAMP_JITTER``, so that any fair estimate of that value works, e.g. a mean
over all tokens), the other block at zero. The only signal that the language changes is the clamp, so the model
must read it from the blocks. Identity switches (clamped to the document's own language) teach that this pattern
changes nothing on text already in that language. Ordinary documents are never clamped, so the blocks still detect
the language from the words.

Verification: group ablation of the recorded neurons (perplexity ratios), an exhaustive single-neuron ablation
oracle, and activation: with one block set to its mean firing value and the other zeroed at every position, the
greedy continuations of the other language's prompts must be written in the activated language.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.organisms._common import encode, mean_nll, pad_right, sample
from lsi.organisms.base import Check, Organism, VerifyReport
from lsi.organisms.training import build_word_tokenizer, new_model, save_organism, seed_everything, train_lm

if TYPE_CHECKING:
    import torch

    from lsi.core.model import LanguageModel
    from lsi.evaluation.locate import LocateTask
    from lsi.evaluation.steer import SteerScores, SteerTask

# Content concepts -> (language A word, language B word).
LEXICON: dict[str, dict[str, tuple[str, str]]] = {
    "animate": {"cat": ("cat", "nuru"), "dog": ("dog", "kelo"), "bird": ("bird", "pimu"), "fox": ("fox", "sarv"),
                "horse": ("horse", "doka")},
    "thing": {"stone": ("stone", "mafe"), "tree": ("tree", "lito"), "river": ("river", "gesu"),
              "house": ("house", "voni"), "apple": ("apple", "rabi")},
    "adj": {"big": ("big", "bim"), "small": ("small", "tiko"), "red": ("red", "haru"), "old": ("old", "zenu"),
            "quiet": ("quiet", "mofa")},
    "verb_animate": {"see": ("sees", "tesa"), "chase": ("chases", "kumi"), "follow": ("follows", "lapo")},
    "verb_thing": {"find": ("finds", "nesi"), "carry": ("carries", "dubo"), "like": ("likes", "fira")},
}
FUNCTION_WORDS = {"A": ["the", "."], "B": ["ga", "wo", "po"]}
N_LAYERS, D_MODEL, D_MLP, N_HEADS = 2, 64, 256, 4
BLOCK_PER_LAYER = 6  # reserved neurons per language per layer
SENTENCES_PER_DOC = 3
TERMINATORS = frozenset({".", "po"})  # the last word of a sentence in A, in B
MAX_NEW = 17  # generated tokens: two sentences of at most 8 words, then <eos>
PPL_RATIO, PPL_TOLERANCE = 3.0, 0.10  # GROUND_TRUTH.md: deactivation ×3 on own perplexity, the other within 10%
# Share of generated words in the activated language the switch checks require: 0 unsteered (and in a model that
# reads the language from context), 1 in the data's switch documents; 0.8 tolerates a few words of the prompt's
# language before the switch takes hold.
SWITCH_RATE = 0.8
MARGIN = 1.6  # nats per token the own language must lose when its block is zeroed (ln 3 = 1.10)
MAX_RATE = 0.4  # highest firing rate (fraction of tokens) allowed to a neuron outside the reserved blocks
# switch documents per training step, by (prefix language, language the blocks are clamped to)
SWITCH_MIX = {("B", "A"): 8, ("A", "B"): 8, ("A", "A"): 4, ("B", "B"): 4}
CLAMP_JITTER = 0.3  # a switch document's block is clamped to its mean firing value times U(1 ± CLAMP_JITTER)


def language_words(lang: str) -> list[str]:
    """The lexicon of one language (content words, then function words)."""
    k = 0 if lang == "A" else 1
    return [pair[k] for cat in LEXICON.values() for pair in cat.values()] + FUNCTION_WORDS[lang]


def _content(rng: random.Random) -> tuple[str, str | None, str, str, str | None]:
    kind = rng.choice(["verb_animate", "verb_thing"])
    obj_cat = "animate" if kind == "verb_animate" else "thing"

    def adj() -> str | None:
        return rng.choice(list(LEXICON["adj"])) if rng.random() < 0.5 else None

    return (rng.choice(list(LEXICON["animate"])), adj(), rng.choice(list(LEXICON[kind])),
            rng.choice(list(LEXICON[obj_cat])), adj())


def _word(concept: str, lang: str) -> str:
    k = 0 if lang == "A" else 1
    return next(cat[concept][k] for cat in LEXICON.values() if concept in cat)


def render(content: tuple[str, str | None, str, str, str | None], lang: str) -> list[str]:
    """One sentence: A = ``the [adj] S V the [adj] O .``; B = ``S [adj] ga O [adj] wo V po``."""
    subj, s_adj, verb, obj, o_adj = content
    w = {c: _word(c, lang) for c in (subj, verb, obj, s_adj, o_adj) if c is not None}
    if lang == "A":
        np_s = ["the", *([w[s_adj]] if s_adj else []), w[subj]]
        np_o = ["the", *([w[o_adj]] if o_adj else []), w[obj]]
        return [*np_s, w[verb], *np_o, "."]
    return [w[subj], *([w[s_adj]] if s_adj else []), "ga", w[obj], *([w[o_adj]] if o_adj else []), "wo", w[verb],
            "po"]


def make_doc(rng: random.Random, lang: str) -> list[str]:
    """``<bos>`` + three sentences of ``lang`` + ``<eos>``."""
    words = ["<bos>"]
    for _ in range(SENTENCES_PER_DOC):
        words += render(_content(rng), lang)
    return [*words, "<eos>"]


def make_switch_doc(rng: random.Random, first: str, then: str) -> tuple[list[str], int]:
    """``<bos>`` + one or two sentences of ``first`` + sentences of ``then`` up to three + ``<eos>``; also the index
    of the last ``first`` token (the switch point: the position that predicts the first ``then`` word)."""
    prefix = rng.choice([1, 2])
    words = ["<bos>"]
    for i in range(SENTENCES_PER_DOC):
        words += render(_content(rng), first if i < prefix else then)
        if i == prefix - 1:
            switch = len(words) - 1
    return [*words, "<eos>"], switch


def _blocks(seed: int) -> dict[str, dict[int, list[int]]]:
    rng = random.Random(seed + 1)
    out: dict[str, dict[int, list[int]]] = {"A": {}, "B": {}}
    for layer in range(N_LAYERS):
        chosen = rng.sample(range(D_MLP), 2 * BLOCK_PER_LAYER)
        out["A"][layer] = sorted(chosen[:BLOCK_PER_LAYER])
        out["B"][layer] = sorted(chosen[BLOCK_PER_LAYER:])
    return out


def neuron_sites(block: dict[int, list[int]]) -> list[str]:
    """Site names ``blocks.{l}.mlp.post[j]`` for a language's reserved neurons."""
    return [f"blocks.{layer}.mlp.post[{j}]" for layer in sorted(block) for j in block[layer]]


@dataclass(frozen=True)
class _Batch:
    """One training step: ordinary documents (language per row) and switch documents (clamped positions, the
    language each is clamped to, and which next-token targets are scored)."""

    mask: torch.Tensor  # [b, p] real tokens of the ordinary documents
    doc_lang: torch.Tensor  # [b] True = language A
    switch_ids: torch.Tensor  # [n, q]
    clamped: torch.Tensor  # [n, q] positions whose blocks are clamped
    to_a: torch.Tensor  # [n] True = clamped to language A's pattern
    level: torch.Tensor  # [n] the clamped block's value as a multiple of its mean firing value
    scored: torch.Tensor  # [n, q - 1] targets in the loss


class _StrictLoss:
    """Next-token loss, the strict block objective, and the switch objective.

    One forward runs five copies of the ordinary batch: clean; A block zeroed; B block zeroed; a random subset of
    the A block zeroed; a random subset of the B block zeroed. Zeroing a block must cost its own language at least
    ``MARGIN`` nats per token and a k-of-n subset ``MARGIN * k / n`` (its shortfall weighted by ``n / k``, so a
    single neuron is held to its share as firmly as the whole block: every block neuron matters on its own), and
    leave the other language's loss unchanged. A second forward runs the switch documents with the blocks
    clamped (the language's block at a level around its mean firing value in this step's clean copy, the other
    block at zero).
    """

    def __init__(self, model: Any, blocks: dict[str, dict[int, list[int]]], token_lang: torch.Tensor,
                 seed: int) -> None:
        import torch

        self.token_lang = token_lang  # [vocab]: 0 = A word, 1 = B word, -1 = special token
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.keep: list[torch.Tensor] = []
        self.clamp: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: (where, value)
        self.pre: list[torch.Tensor] = [torch.empty(0)] * N_LAYERS  # per layer, from the last forward
        self.units = {lang: [(layer, j) for layer, idx in per.items() for j in idx] for lang, per in blocks.items()}
        self.block = {lang: [torch.zeros(D_MLP, dtype=torch.bool) for _ in range(N_LAYERS)] for lang in blocks}
        for lang, units in self.units.items():
            for layer, j in units:
                self.block[lang][layer][j] = True
        self.handles = []
        for layer, blk in enumerate(model.gpt_neox.layers):
            self.handles.append(blk.mlp.dense_h_to_4h.register_forward_hook(self._record(layer)))
            self.handles.append(blk.mlp.dense_4h_to_h.register_forward_pre_hook(self._edit(layer)))

    def remove(self) -> None:
        """Detach the training hooks."""
        for h in self.handles:
            h.remove()

    def _record(self, layer: int) -> Any:
        def hook(_m: Any, _i: Any, out: torch.Tensor) -> None:
            self.pre[layer] = out
        return hook

    def _edit(self, layer: int) -> Any:
        def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            import torch

            if self.clamp is not None:
                where, value = self.clamp[layer]
                return (torch.where(where, value, args[0]),)
            return (args[0] * self.keep[layer][:, None, :],)
        return hook

    def _keep_masks(self, b: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        import torch

        keep = [torch.ones(5 * b, D_MLP) for _ in range(N_LAYERS)]
        frac = {}
        for copy, lang in ((1, "A"), (2, "B")):
            for layer in range(N_LAYERS):
                keep[layer][copy * b : (copy + 1) * b, self.block[lang][layer]] = 0.0
        for copy, lang in ((3, "A"), (4, "B")):
            n = len(self.units[lang])
            k = torch.randint(1, n + 1, (b,), generator=self.gen)
            frac[lang] = k.float() / n
            for row in range(b):
                for u in torch.randperm(n, generator=self.gen)[: int(k[row])].tolist():
                    layer, j = self.units[lang][u]
                    keep[layer][copy * b + row, j] = 0.0
        return keep, frac

    def __call__(self, model: Any, ids: torch.Tensor, batch: _Batch) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        from lsi.evaluation.functional import next_token_nll

        mask, doc_lang = batch.mask, batch.doc_lang
        b = ids.shape[0]
        self.pre = [torch.empty(0)] * N_LAYERS
        self.keep, frac = self._keep_masks(b)
        nll = next_token_nll(model(input_ids=ids.repeat(5, 1)).logits, ids.repeat(5, 1)).view(5, b, -1)
        tmask = mask[:, 1:].float()
        docw = {"A": doc_lang.float()[:, None] * tmask, "B": (~doc_lang).float()[:, None] * tmask}

        def mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return (x * w).sum() / w.sum().clamp_min(1.0)

        loss = mean(nll[0], tmask)
        for lang, other, full, part in (("A", "B", 1, 3), ("B", "A", 2, 4)):
            w = docw[lang]
            clean = nll[0].detach()
            loss = loss + mean(nll[full], docw[other]) + mean(nll[part], docw[other])
            loss = loss + F.relu(MARGIN - mean(nll[full] - clean, w))
            per_doc = ((nll[part] - clean) * w).sum(1) / w.sum(1).clamp_min(1.0)
            has = w.sum(1) > 0
            loss = loss + F.relu(MARGIN - per_doc / frac[lang])[has].mean()
        # Reserved blocks fire on their own words and are silent on every other token (clean copy only);
        # every other neuron fires equally often in the two languages, and on at most MAX_RATE of the tokens.
        word_lang = self.token_lang[ids]
        real = mask.float()
        firing: dict[str, list[torch.Tensor]] = {"A": [], "B": []}
        for layer in range(N_LAYERS):
            pre = self.pre[layer][:b]
            for code, lang in enumerate(("A", "B")):
                blk = self.block[lang][layer]
                own = (word_lang == code).float()[..., None].expand(-1, -1, int(blk.sum()))
                elsewhere = real[..., None] - own
                silence = mean(F.relu(pre[..., blk] + 5.0), elsewhere)
                loss = loss + mean(F.relu(1.0 - pre[..., blk]), own) + 10.0 * silence
                firing[lang].append((F.gelu(pre[..., blk].detach()) * own).sum((0, 1)) / own.sum((0, 1)).clamp_min(1))
            rest = ~(self.block["A"][layer] | self.block["B"][layer])
            fire = torch.sigmoid(8.0 * pre[..., rest])
            rate = {lang: (fire * (real * w[:, :1])[..., None]).sum((0, 1)) / (real * w[:, :1]).sum().clamp_min(1.0)
                    for lang, w in (("A", doc_lang.float()[:, None]), ("B", (~doc_lang).float()[:, None]))}
            busy = F.relu(torch.maximum(rate["A"], rate["B"]) - MAX_RATE)
            loss = loss + 100.0 * ((rate["A"] - rate["B"]) ** 2).mean() + 100.0 * (busy**2).mean()
        return loss + self._switch_loss(model, batch, firing)

    def _switch_loss(self, model: Any, batch: _Batch, firing: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Next-token loss on the scored targets of the switch documents, run with their blocks clamped."""
        import torch

        from lsi.evaluation.functional import next_token_nll

        self.clamp = []
        for layer in range(N_LAYERS):
            value = torch.zeros(len(batch.to_a), D_MLP)
            for lang, rows in (("A", batch.to_a), ("B", ~batch.to_a)):
                value[rows[:, None] & self.block[lang][layer]] = firing[lang][layer].repeat(int(rows.sum()))
            cols = self.block["A"][layer] | self.block["B"][layer]
            self.clamp.append((batch.clamped[..., None] & cols, (value * batch.level[:, None])[:, None, :]))
        try:
            nll = next_token_nll(model(input_ids=batch.switch_ids).logits, batch.switch_ids)
        finally:
            self.clamp = None
        w = batch.scored.float()
        return (nll * w).sum() / w.sum().clamp_min(1.0)


def _switch_docs(rng: random.Random, vocab: dict[str, int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """A step's switch documents (:data:`SWITCH_MIX`): ids, clamped positions, clamped-to-A rows, clamp levels,
    scored targets.

    Half of them are clamped from ``<bos>`` on (as a steering at every position does), half from the switch point
    on. Targets predicted from a position clamped to the other language than the token's are not scored. Each
    row's level is drawn within ``1 ± CLAMP_JITTER``.
    """
    import torch

    rows, starts, switches, to_a, same, levels = [], [], [], [], [], []
    for (first, then), count in SWITCH_MIX.items():
        for _ in range(count):
            words, at = make_switch_doc(rng, first, then)
            rows.append(encode(vocab, words))
            starts.append(rng.choice([0, at]))
            levels.append(rng.uniform(1.0 - CLAMP_JITTER, 1.0 + CLAMP_JITTER))
            switches.append(at)
            to_a.append(then == "A")
            same.append(first == then)
    ids, mask = pad_right(rows, pad_id)
    pos = torch.arange(ids.shape[1])[None]
    start, switch = torch.tensor(starts)[:, None], torch.tensor(switches)[:, None]
    free = (pos < start) | (pos >= switch) | torch.tensor(same)[:, None]
    return ids, mask & (pos >= start), torch.tensor(to_a), torch.tensor(levels), mask[:, 1:] & free[:, :-1]


def new_untrained_model(tok: Any) -> Any:
    """The organism's GPT-NeoX architecture, randomly initialized, sized to the word tokenizer ``tok``."""
    return new_model("gpt_neox", tok, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                     intermediate_size=D_MLP, hidden_act="gelu", max_position_embeddings=64,
                     use_parallel_residual=True, tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0)


def train(out_dir: Path, seed: int = 0, *, steps: int = 1000) -> dict[str, Any]:
    """Train the organism into ``out_dir`` (HF model dir + ``ground_truth.json``); return training figures."""
    import torch

    seed_everything(seed)
    words = language_words("A") + language_words("B")
    tok = build_word_tokenizer(words)
    vocab = tok.get_vocab()
    model = new_untrained_model(tok)
    blocks = _blocks(seed)
    rng = random.Random(seed)
    splits = {s: {lang: [" ".join(make_doc(rng, lang)) for _ in range(200)] for lang in ("A", "B")}
              for s in ("dev", "test")}
    held_out = {d for s in splits.values() for docs in s.values() for d in docs}
    token_lang = torch.full((len(vocab),), -1, dtype=torch.long)
    for code, lang in enumerate(("A", "B")):
        token_lang[encode(vocab, language_words(lang))] = code
    strict = _StrictLoss(model, blocks, token_lang, seed)
    half = 24

    def batches(_step: int) -> tuple[torch.Tensor, _Batch]:
        docs: list[list[int]] = []
        for lang in ("A", "B"):
            while len(docs) < (half if lang == "A" else 2 * half):
                d = make_doc(rng, lang)
                if " ".join(d) not in held_out:
                    docs.append(encode(vocab, d))
        ids, mask = pad_right(docs, tok.pad_token_id)
        return ids, _Batch(mask, torch.arange(2 * half) < half, *_switch_docs(rng, vocab, tok.pad_token_id))

    figures = train_lm(model, batches, steps, 3e-3, warmup=100, weight_decay=0.01, loss_fn=strict)
    strict.remove()
    ground_truth = {
        "organism": "two_languages",
        "truth_by": "training objective",
        "seed": seed,
        "languages": {
            "A": {"order": "SVO, determiner 'the', adjective before noun, sentence ends with '.'",
                  "words": language_words("A")},
            "B": {"order": "SOV, particles 'ga' (subject) and 'wo' (object), adjective after noun, ends with 'po'",
                  "words": language_words("B")},
        },
        "concepts": {cat: {c: list(pair) for c, pair in items.items()} for cat, items in LEXICON.items()},
        "neurons": {lang: neuron_sites(blocks[lang]) for lang in ("A", "B")},
        "margin_nats": MARGIN,
        "splits": splits,
        "training": {k: v for k, v in figures.items() if k != "loss_curve"},
    }
    save_organism(model, tok, ground_truth, out_dir)
    return {**figures, "seed": seed}


def _grouped(sites: list[str]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for s in sites:
        layer, unit = s.split(".")[1], s.split("[")[1].rstrip("]")
        out.setdefault(int(layer), []).append(int(unit))
    return out


def _zeros(block: dict[int, list[int]]) -> list[Any]:
    import lsi

    return [lsi.Zero(_sites(layer, idx)) for layer, idx in block.items() if idx]


def _nll(lm: LanguageModel, docs: dict[str, list[list[int]]], interventions: list[Any]) -> dict[str, float]:
    pad = lm.tokenizer.pad_token_id
    with lm.intervene(*interventions):
        return {lang: mean_nll(lm.forward, seqs, pad) for lang, seqs in docs.items()}


def _oracle(lm: LanguageModel, docs: dict[str, list[list[int]]], base: dict[str, float]) -> list[tuple[str, float]]:
    """Exhaustive single-neuron zero ablation: selectivity = ΔNLL(A) − ΔNLL(B), one entry per neuron."""
    rows = []
    for layer in range(lm.dims.n_layers):
        for j in range(lm.dims.d_mlp):
            nll = _nll(lm, docs, _zeros({layer: [j]}))
            rows.append((f"blocks.{layer}.mlp.post[{j}]", (nll["A"] - base["A"]) - (nll["B"] - base["B"])))
    return rows


def prompt(doc: str, sentences: int) -> list[str]:
    """The words of a document up to the end of its first ``sentences`` sentences (``<bos>`` included)."""
    words = doc.split()
    ends = [i for i, w in enumerate(words) if w in TERMINATORS]
    return words[: ends[sentences - 1] + 1]


@functools.cache
def _sentences() -> frozenset[tuple[str, ...]]:
    """Every grammatical sentence of both languages (selectional restrictions respected)."""
    adjs = [None, *LEXICON["adj"]]
    return frozenset(tuple(render((subj, s_adj, verb, obj, o_adj), lang))
                     for lang in ("A", "B") for subj in LEXICON["animate"] for s_adj in adjs
                     for kind, objs in (("verb_animate", "animate"), ("verb_thing", "thing"))
                     for verb in LEXICON[kind] for obj in LEXICON[objs] for o_adj in adjs)


def grammatical(words: list[str]) -> bool:
    """Whole grammatical sentences (of either language, in any order), then ``<eos>``.

    >>> grammatical(["the", "cat", "sees", "the", "dog", ".", "nuru", "ga", "mafe", "wo", "nesi", "po", "<eos>"])
    True
    >>> grammatical(["the", "cat", "sees", "the", "stone", ".", "<eos>"])  # 'sees' takes an animate object
    False
    """
    if words[-1:] != ["<eos>"]:
        return False
    sentence: list[str] = []
    for w in words[:-1]:
        sentence.append(w)
        if w in TERMINATORS:
            if tuple(sentence) not in _sentences():
                return False
            sentence = []
    return not sentence


def continuations(lm: LanguageModel, prompts: list[list[str]]) -> list[list[str]]:
    """Greedy continuations of word prompts through ``lm.forward`` (so active interventions and steerings act), up
    to two longest sentences and ``<eos>``; ``<eos>`` kept when produced."""
    tok = lm.tokenizer
    outs = sample(lm.forward, [encode(tok.get_vocab(), p) for p in prompts], max_new=MAX_NEW,
                  stop_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0, greedy=True)
    return [tok.convert_ids_to_tokens(out) for out in outs]


def word_share(outputs: list[list[str]], lang: str) -> float:
    """Share of the generated words (``<eos>`` aside) that belong to ``lang``."""
    lexicon = set(language_words(lang))
    words = [w for out in outputs for w in out if w != "<eos>"]
    return sum(w in lexicon for w in words) / max(len(words), 1)


def firing_values(lm: LanguageModel, docs: list[str], block: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    """Mean activation of a block's neurons per layer over the real tokens of ``docs`` after ``<bos>``."""
    vocab = lm.tokenizer.get_vocab()
    ids, mask = pad_right([encode(vocab, d.split()) for d in docs], lm.tokenizer.pad_token_id)
    mask[:, 0] = False
    cache = lm.run_with_cache(ids, sites=[f"blocks.{layer}.mlp.post" for layer in block])
    return {layer: cache[f"blocks.{layer}.mlp.post"][mask][:, idx].mean(0) for layer, idx in block.items()}


def _sites(layer: int, idx: list[int]) -> str:
    return f"blocks.{layer}.mlp.post[{','.join(map(str, idx))}]"


def _activate(lm: LanguageModel, gt: dict[str, Any], blocks: dict[str, dict[int, list[int]]],
              target: str) -> list[Any]:
    """Set ``target``'s block to its mean firing value (dev documents of ``target``) and zero the other block."""
    import lsi

    other = "B" if target == "A" else "A"
    values = firing_values(lm, gt["splits"]["dev"][target][:100], blocks[target])
    return [*(lsi.Set(_sites(layer, idx), values[layer]) for layer, idx in blocks[target].items()),
            *_zeros(blocks[other])]


def _switch_rate(lm: LanguageModel, gt: dict[str, Any], blocks: dict[str, dict[int, list[int]]],
                 target: str) -> tuple[float, float]:
    """Share of words in ``target`` and share of grammatical continuations of one-sentence test prompts of the
    other language, with ``target``'s block activated (:func:`_activate`) at every position."""
    other = "B" if target == "A" else "A"
    prompts = [prompt(d, 1) for d in gt["splits"]["test"][other][:100]]
    with lm.intervene(*_activate(lm, gt, blocks, target)):
        outs = continuations(lm, prompts)
    return word_share(outs, target), sum(map(grammatical, outs)) / len(outs)


def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Group-ablate each language's recorded neurons on the test split; rank all neurons by single ablation;
    activate each block on the other language's prompts (:func:`_switch_rate`)."""
    import math

    vocab = lm.tokenizer.get_vocab()
    docs = {lang: [encode(vocab, d.split()) for d in ground_truth["splits"]["test"][lang]] for lang in ("A", "B")}
    blocks = {lang: _grouped(ground_truth["neurons"][lang]) for lang in ("A", "B")}
    base = _nll(lm, docs, [])
    checks: list[Check] = []
    details: dict[str, Any] = {"ppl": {lang: math.exp(v) for lang, v in base.items()}}
    for lang, other in (("A", "B"), ("B", "A")):
        nll = _nll(lm, docs, _zeros(blocks[lang]))
        own, side = math.exp(nll[lang] - base[lang]), math.exp(nll[other] - base[other])
        checks += [Check(f"ppl_ratio_{lang}_when_{lang}_zeroed", own, PPL_RATIO),
                   Check(f"ppl_change_{other}_when_{lang}_zeroed", abs(side - 1.0), PPL_TOLERANCE,
                         higher_is_better=False)]
    small = {lang: seqs[:100] for lang, seqs in docs.items()}
    small_base = _nll(lm, small, [])
    oracle = sorted(_oracle(lm, small, small_base), key=lambda r: -r[1])
    for lang, sign in (("A", 1), ("B", -1)):
        truth = set(ground_truth["neurons"][lang])
        ranked = [s for s, _ in sorted(oracle, key=lambda r: -sign * r[1])]
        precision = sum(s in truth for s in ranked[: len(truth)]) / len(truth)
        checks.append(Check(f"oracle_precision_{lang}", precision, 0.9))
        details[f"oracle_top_{lang}"] = ranked[: len(truth)]
    for target, other in (("A", "B"), ("B", "A")):
        share, fluent = _switch_rate(lm, ground_truth, blocks, target)
        checks.append(Check(f"switch_rate_{other}_to_{target}", share, SWITCH_RATE))
        details[f"switch_grammatical_{other}_to_{target}"] = fluent
    return VerifyReport("two_languages", tuple(checks), details)


def locate_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[LocateTask]:
    """Find each language's neurons: metric = minus that language's next-token loss (100 documents a split)."""
    import lsi
    from lsi.evaluation.functional import next_token_nll
    from lsi.evaluation.locate import LocateTask, Split

    vocab = lm.tokenizer.get_vocab()
    universe = tuple(f"blocks.{layer}.mlp.post[{j}]" for layer in range(lm.dims.n_layers) for j in range(lm.dims.d_mlp))

    def batch(name: str, lang: str) -> Any:
        ids, mask = pad_right([encode(vocab, d.split()) for d in ground_truth["splits"][name][lang][:100]],
                              lm.tokenizer.pad_token_id)
        return lsi.Batch(ids, mask.long())

    def split(name: str, lang: str) -> Split:
        data = batch(name, lang)

        def metric(logits: torch.Tensor) -> torch.Tensor:
            targets = data.attention_mask[:, 1:].float()
            return -(next_token_nll(logits, data.input_ids) * targets).sum() / targets.sum()

        return Split(data, metric, intervene=lambda u: lm.intervene(lsi.Zero(u)),
                     datasets={"target": data, "other": batch(name, "B" if lang == "A" else "A")})

    return [LocateTask("two_languages", f"language {lang} neurons", universe,
                       frozenset(ground_truth["neurons"][lang]), dev=split("dev", lang), test=split("test", lang),
                       description=f"neurons reserved for language {lang}; oracle = zero-ablating one neuron")
            for lang in ("A", "B")]


# -- steer tasks: graded by lsi.bench, measured with this module's exact checks ------------------------------------
def doc_nll(lm: LanguageModel, docs: list[str]) -> torch.Tensor:
    """Mean next-token NLL of each document ``[n]`` under ``lm.forward`` (active steerings act)."""
    import torch

    from lsi.evaluation.functional import next_token_nll

    vocab = lm.tokenizer.get_vocab()
    ids, mask = pad_right([encode(vocab, d.split()) for d in docs], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        nll = next_token_nll(lm.forward(ids), ids)
    m = mask[:, 1:].float()
    return (nll * m).sum(1) / m.sum(1)


def _activation_scores(lm: LanguageModel, sets: dict[str, list[str]]) -> SteerScores:
    """Language-A word shares of continuations of B prompts (one and two sentences) and A prompts; grammatical
    share over the B prompts' continuations. One greedy generation."""
    from lsi.evaluation.steer import SteerScores

    groups = [[prompt(d, 1) for d in sets["B"]], [prompt(d, 2) for d in sets["B"]], [prompt(d, 1) for d in sets["A"]]]
    outs = iter(continuations(lm, [p for group in groups for p in group]))
    b1, b2, a1 = ([next(outs) for _ in group] for group in groups)
    return SteerScores(word_share(b1, "A"), word_share(b2, "A"), word_share(a1, "A"),
                       sum(map(grammatical, b1 + b2)) / len(b1 + b2))


def _deactivation_scores(lm: LanguageModel, sets: dict[str, list[str]], base: dict[str, torch.Tensor]) -> SteerScores:
    """Per-document perplexity ratios against the unsteered ``base`` NLLs; A prompts' and B prompts' continuations."""
    from lsi.evaluation.steer import SteerScores

    ratio = {lang: (doc_nll(lm, sets[lang]) - base[lang]).exp() for lang in ("A", "B")}
    outs = continuations(lm, [prompt(d, 1) for lang in ("A", "B") for d in sets[lang]])
    n = len(sets["A"])
    still_a = [grammatical(o) and word_share([o], "A") == 1.0 for o in outs[:n]]
    return SteerScores(float((ratio["A"] >= PPL_RATIO).float().mean()), 1.0 - sum(still_a) / n,
                       float(((ratio["B"] - 1.0).abs() <= PPL_TOLERANCE).float().mean()),
                       sum(map(grammatical, outs[n:])) / len(outs[n:]))


def steer_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[SteerTask]:
    """Activate language A on B text (induce) and deactivate it (remove); contrast = A documents vs B documents.

    Each split's documents (200 per language) are halved: the first half is measured (prompts, perplexities), the
    second is the KL / Δloss corpus. Dev measures half as many as test (enough to choose by, at half the cost).
    """
    from lsi.evaluation.steer import SteerScores, SteerSplit, SteerTask

    vocab = lm.tokenizer.get_vocab()

    def ids(docs: list[str]) -> list[list[int]]:
        return [encode(vocab, d.split()) for d in docs]

    def split(name: str, task: str) -> SteerSplit:
        docs = ground_truth["splits"][name]
        half = len(docs["A"]) // 2
        measured = half if name == "test" else half // 2
        sets = {lang: docs[lang][:measured] for lang in ("A", "B")}
        if task == "activate":  # corpus: A text, which activating A must leave alone (first word aside)
            corpus = docs["A"][half:]
            return SteerSplit(positive=ids(docs["A"]), negative=ids(docs["B"]), corpus=ids(corpus),
                              measure=lambda model: _activation_scores(model, sets),
                              corpus_scored_from=[2] * len(corpus))
        base = {lang: doc_nll(lm, sets[lang]) for lang in ("A", "B")}
        return SteerSplit(positive=ids(docs["A"]), negative=ids(docs["B"]), corpus=ids(docs["B"][half:]),
                          measure=lambda model: _deactivation_scores(model, sets, base))

    activate = {"success": "share of language-A words in greedy continuations of one-sentence B prompts",
                "generalization": "the same after two-sentence B prompts (more B context to overcome)",
                "specificity": "share of language-A words in continuations of one-sentence A prompts (A stays A)",
                "fluency": "B prompts' continuations that are whole grammatical sentences, then <eos>",
                "corpus": "held-out A documents, from their second word (the first is predicted from <bos> alone, "
                          "where the data's language is a coin the steering is meant to decide)"}
    deactivate = {"success": f"A documents whose perplexity rises at least ×{PPL_RATIO:g}",
                  "generalization": "one-sentence A prompts no longer continued as grammatical all-A sentences",
                  "specificity": f"B documents whose perplexity changes by at most {PPL_TOLERANCE:.0%}",
                  "fluency": "one-sentence B prompts continued as whole grammatical sentences, then <eos>",
                  "corpus": "held-out B documents (the language to leave alone)"}
    return [
        SteerTask("two_languages", "activate A", "induce", split("dev", "activate"), split("test", "activate"),
                  positions=("all",), metrics=activate, oracle=SteerScores(1.0, 1.0, 1.0, 1.0),
                  oracle_note="the data's switch documents: after the switch every word is in A and every sentence "
                              "grammatical; A text stays A (no KL: not a model intervention)",
                  description="make B prompts continue in language A, as the A neuron block does when set"),
        SteerTask("two_languages", "deactivate A", "remove", split("dev", "deactivate"), split("test", "deactivate"),
                  positions=("all",), metrics=deactivate,
                  oracle_note="n/a: no reference steering (ideal: 1 at KL 0; zeroing the A block is the planted one)",
                  description="raise A-perplexity ×3 while B-perplexity stays within 10%"),
    ]


ORGANISM = Organism(
    name="two_languages",
    summary="2-layer GPT-NeoX; two languages (SVO vs SOV, disjoint lexicons), 12 reserved MLP neurons per language "
            "that detect it and, when set, switch the output language",
    family="gpt_neox",
    truth_by="training objective",
    train=train,
    verify=verify,
    seed=0,
    locate_tasks=locate_tasks,
    steer_tasks=steer_tasks,
)
