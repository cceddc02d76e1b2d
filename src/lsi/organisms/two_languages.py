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
language-specific neurons. Verification is group ablation of the recorded neurons (perplexity ratios) plus
an exhaustive single-neuron ablation oracle.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.organisms._common import encode, mean_nll, pad_right, sample, token_nll
from lsi.organisms.base import Check, Organism, VerifyReport
from lsi.organisms.training import build_word_tokenizer, new_model, save_organism, seed_everything, train_lm

if TYPE_CHECKING:
    import torch

    from lsi.bench.tasks import LocateTask
    from lsi.core.model import LanguageModel

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
MARGIN = 1.6  # nats per token the own language must lose when its block is zeroed (ln 3 = 1.10)
MAX_RATE = 0.4  # highest firing rate (fraction of tokens) allowed to a neuron outside the reserved blocks


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


class _StrictLoss:
    """Next-token loss plus the strict block objective.

    One forward runs five copies of the batch: clean; A block zeroed; B block zeroed; a random subset of the A
    block zeroed; a random subset of the B block zeroed. Zeroing a block must cost its own language at least
    ``MARGIN`` nats per token (``MARGIN * k / n`` for a k-of-n subset, so every block neuron matters on its own)
    and leave the other language's loss unchanged.
    """

    def __init__(self, model: Any, blocks: dict[str, dict[int, list[int]]], token_lang: torch.Tensor,
                 seed: int) -> None:
        import torch

        self.token_lang = token_lang  # [vocab]: 0 = A word, 1 = B word, -1 = special token
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.doc_lang: torch.Tensor | None = None  # [b] bool, True = language A
        self.keep: list[torch.Tensor] = []
        self.pre: list[torch.Tensor] = []
        self.units = {lang: [(layer, j) for layer, idx in per.items() for j in idx] for lang, per in blocks.items()}
        self.block = {lang: [torch.zeros(D_MLP, dtype=torch.bool) for _ in range(N_LAYERS)] for lang in blocks}
        for lang, units in self.units.items():
            for layer, j in units:
                self.block[lang][layer][j] = True
        self.handles = []
        for layer, blk in enumerate(model.gpt_neox.layers):
            self.handles.append(blk.mlp.dense_h_to_4h.register_forward_hook(self._record(layer)))
            self.handles.append(blk.mlp.dense_4h_to_h.register_forward_pre_hook(self._mask(layer)))

    def remove(self) -> None:
        """Detach the training hooks."""
        for h in self.handles:
            h.remove()

    def _record(self, layer: int) -> Any:
        def hook(_m: Any, _i: Any, out: torch.Tensor) -> None:
            self.pre[layer] = out
        return hook

    def _mask(self, layer: int) -> Any:
        def hook(_m: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
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

    def __call__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        assert mask is not None and self.doc_lang is not None
        b = ids.shape[0]
        self.pre = [torch.empty(0)] * N_LAYERS
        self.keep, frac = self._keep_masks(b)
        nll = token_nll(model(input_ids=ids.repeat(5, 1)).logits, ids.repeat(5, 1)).view(5, b, -1)
        tmask = mask[:, 1:].float()
        docw = {"A": self.doc_lang.float()[:, None] * tmask, "B": (~self.doc_lang).float()[:, None] * tmask}

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
            loss = loss + F.relu(MARGIN * frac[lang] - per_doc)[has].mean()
        # Reserved blocks fire on their own words and are silent on every other token (clean copy only);
        # every other neuron fires equally often in the two languages, and on at most MAX_RATE of the tokens.
        word_lang = self.token_lang[ids]
        real = mask.float()
        for layer in range(N_LAYERS):
            pre = self.pre[layer][:b]
            for code, lang in enumerate(("A", "B")):
                blk = self.block[lang][layer]
                own = (word_lang == code).float()[..., None].expand(-1, -1, int(blk.sum()))
                elsewhere = real[..., None] - own
                silence = mean(F.relu(pre[..., blk] + 5.0), elsewhere)
                loss = loss + mean(F.relu(1.0 - pre[..., blk]), own) + 10.0 * silence
            rest = ~(self.block["A"][layer] | self.block["B"][layer])
            fire = torch.sigmoid(8.0 * pre[..., rest])
            rate = {lang: (fire * (real * w[:, :1])[..., None]).sum((0, 1)) / (real * w[:, :1]).sum().clamp_min(1.0)
                    for lang, w in (("A", self.doc_lang.float()[:, None]), ("B", (~self.doc_lang).float()[:, None]))}
            busy = F.relu(torch.maximum(rate["A"], rate["B"]) - MAX_RATE)
            loss = loss + 100.0 * ((rate["A"] - rate["B"]) ** 2).mean() + 100.0 * (busy**2).mean()
        return loss


def train(out_dir: Path, seed: int = 0, *, steps: int = 1000) -> dict[str, Any]:
    """Train the organism into ``out_dir`` (HF model dir + ``ground_truth.json``); return training figures."""
    import torch

    seed_everything(seed)
    words = language_words("A") + language_words("B")
    tok = build_word_tokenizer(words)
    vocab = tok.get_vocab()
    model = new_model("gpt_neox", tok, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                      intermediate_size=D_MLP, hidden_act="gelu", max_position_embeddings=64,
                      use_parallel_residual=True, tie_word_embeddings=False, attention_dropout=0.0,
                      hidden_dropout=0.0)
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

    def batches(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        docs: list[list[int]] = []
        for lang in ("A", "B"):
            while len(docs) < (half if lang == "A" else 2 * half):
                d = make_doc(rng, lang)
                if " ".join(d) not in held_out:
                    docs.append(encode(vocab, d))
        strict.doc_lang = torch.arange(2 * half) < half
        return pad_right(docs, tok.pad_token_id)

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

    return [lsi.Zero(f"blocks.{layer}.mlp.post[{','.join(map(str, idx))}]") for layer, idx in block.items() if idx]


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


def _switch_rate(lm: LanguageModel, gt: dict[str, Any], blocks: dict[str, dict[int, list[int]]]) -> float:
    """Fraction of greedy continuations of B prompts written in A when the A block is set to its mean A value
    and the B block is zeroed (a diagnostic of the steering use, not a check)."""
    import lsi

    vocab, pad = lm.tokenizer.get_vocab(), lm.tokenizer.pad_token_id
    a_docs = [encode(vocab, d.split()) for d in gt["splits"]["dev"]["A"][:100]]
    ids, mask = pad_right(a_docs, pad)
    mask[:, 0] = False
    sites = [f"blocks.{layer}.mlp.post" for layer in range(lm.dims.n_layers)]
    cache = lm.run_with_cache(ids, sites=sites)
    ops = []
    for layer, site in enumerate(sites):
        mean_a = cache[site][mask].mean(0)

        def fn(x: torch.Tensor, mean_a: torch.Tensor = mean_a, layer: int = layer) -> torch.Tensor:
            x = x.clone()
            x[..., blocks["A"][layer]] = mean_a[blocks["A"][layer]].to(x.dtype)
            x[..., blocks["B"][layer]] = 0.0
            return x

        ops.append(lsi.Apply(site, fn))
    prompts = [encode(vocab, d.split()[: d.split().index("po") + 1]) for d in gt["splits"]["test"]["B"][:100]]
    a_words = set(gt["languages"]["A"]["words"])
    with lm.intervene(*ops):
        outs = sample(lm.forward, prompts, max_new=8, stop_id=lm.tokenizer.eos_token_id, pad_id=pad, seed=0,
                      greedy=True)
    words = [w for out in outs for w in lm.tokenizer.convert_ids_to_tokens(out) if w not in ("<eos>", "<pad>")]
    return sum(w in a_words for w in words) / max(len(words), 1)


def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Group-ablate each language's recorded neurons on the test split; rank all neurons by single ablation."""
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
        checks += [Check(f"ppl_ratio_{lang}_when_{lang}_zeroed", own, 3.0),
                   Check(f"ppl_change_{other}_when_{lang}_zeroed", abs(side - 1.0), 0.10, higher_is_better=False)]
    small = {lang: seqs[:100] for lang, seqs in docs.items()}
    small_base = _nll(lm, small, [])
    oracle = sorted(_oracle(lm, small, small_base), key=lambda r: -r[1])
    for lang, sign in (("A", 1), ("B", -1)):
        truth = set(ground_truth["neurons"][lang])
        ranked = [s for s, _ in sorted(oracle, key=lambda r: -sign * r[1])]
        precision = sum(s in truth for s in ranked[: len(truth)]) / len(truth)
        checks.append(Check(f"oracle_precision_{lang}", precision, 0.9))
        details[f"oracle_top_{lang}"] = ranked[: len(truth)]
    details["switch_rate_B_to_A"] = _switch_rate(lm, ground_truth, blocks)
    return VerifyReport("two_languages", tuple(checks), details)


def locate_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[LocateTask]:
    """Find each language's neurons: metric = minus that language's next-token loss (100 documents a split)."""

    import lsi
    from lsi.bench.tasks import LocateTask, Split

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
            return -(token_nll(logits, data.input_ids) * targets).sum() / targets.sum()

        return Split(data, metric, intervene=lambda u: lm.intervene(lsi.Zero(u)),
                     datasets={"target": data, "other": batch(name, "B" if lang == "A" else "A")})

    return [LocateTask("two_languages", f"language {lang} neurons", universe,
                       frozenset(ground_truth["neurons"][lang]), dev=split("dev", lang), test=split("test", lang),
                       description=f"neurons reserved for language {lang}; oracle = zero-ablating one neuron")
            for lang in ("A", "B")]


ORGANISM = Organism(
    name="two_languages",
    summary="2-layer GPT-NeoX; two languages (SVO vs SOV, disjoint lexicons), 12 reserved MLP neurons per language",
    family="gpt_neox",
    truth_by="training objective",
    train=train,
    verify=verify,
    seed=0,
    locate_tasks=locate_tasks,
)
