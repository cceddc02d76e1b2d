"""Toy-superposition organism: sparse hierarchical features compressed into the embedding of a 1-layer GPT-2.

By construction, every token's embedding row is ``codes[token] @ directions``: ``directions`` [n_features,
d_model] are random unit vectors with n_features > d_model, and ``codes`` [vocab, n_features] are sparse,
non-negative and hierarchical (a child feature is only ever active together with its parent). Positional
embeddings are zero, so the ``embed`` site (= ``blocks.0.resid_pre``) carries exactly the features.

Text is ``<bos> x f x f ...``: a random data token ``x`` (1–3 root features, parents often with one child)
followed by the name token ``f`` of one of its active features, chosen uniformly. Name token ``f_i`` embeds
feature ``i`` (with its parent, if it is a child). The embeddings are frozen; the block and the unembedding
learn to read the features out of superposition, which makes them matter to the model's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.organisms.base import Check, Organism, VerifyReport

if TYPE_CHECKING:
    import torch

    from lsi.core.model import LanguageModel

D_MODEL, N_PARENTS, N_CHILDREN, N_STANDALONE, N_DATA_TOKENS = 32, 12, 3, 16, 2048
N_FEATURES = N_PARENTS * (1 + N_CHILDREN) + N_STANDALONE
SEQ_LEN, STEPS, BATCH, LR = 33, 1000, 32, 3e-3
SITE = "embed"


def hierarchy() -> dict[str, Any]:
    """Feature layout: parents first, then each parent's children, then standalone features."""
    children = {p: [N_PARENTS + p * N_CHILDREN + c for c in range(N_CHILDREN)] for p in range(N_PARENTS)}
    first_standalone = N_PARENTS * (1 + N_CHILDREN)
    return {
        "parents": list(range(N_PARENTS)),
        "children": {str(p): cs for p, cs in children.items()},
        "parent_of": {str(c): p for p, cs in children.items() for c in cs},
        "standalone": list(range(first_standalone, first_standalone + N_STANDALONE)),
    }


def make_codes(gen: torch.Generator) -> torch.Tensor:
    """Sparse hierarchical codes [N_DATA_TOKENS, N_FEATURES]: 1–3 roots, a parent adds one child with p = 0.6."""
    import torch

    roots = list(range(N_PARENTS)) + hierarchy()["standalone"]
    codes = torch.zeros(N_DATA_TOKENS, N_FEATURES)
    for row in codes:
        n_roots = int(torch.randint(1, 4, (1,), generator=gen))
        for r in torch.randperm(len(roots), generator=gen)[:n_roots].tolist():
            feature = roots[r]
            row[feature] = 0.5 + torch.rand(1, generator=gen).item()
            if feature < N_PARENTS and torch.rand(1, generator=gen).item() < 0.6:
                child = N_PARENTS + feature * N_CHILDREN + int(torch.randint(0, N_CHILDREN, (1,), generator=gen))
                row[child] = 0.5 + torch.rand(1, generator=gen).item()
    return codes


def all_codes(data_codes: torch.Tensor, n_specials: int) -> torch.Tensor:
    """Codes for the whole vocabulary: specials (zero), data tokens, then name tokens.

    Name token ``f_i`` has feature ``i`` at 1.0, and its parent at 1.0 when ``i`` is a child, so the hierarchy
    holds for every token.
    """
    import torch

    names = torch.eye(N_FEATURES)
    for child, parent in hierarchy()["parent_of"].items():
        names[int(child), parent] = 1.0
    return torch.cat([torch.zeros(n_specials, N_FEATURES), data_codes, names])


def sample_batch(data: dict[str, Any], codes: torch.Tensor, n: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``<bos> x f x f ...``: (ids [n, seq_len], mask of the name-token targets)."""
    import torch

    pairs = (data["seq_len"] - 1) // 2
    x = torch.randint(data["first_data_id"], data["first_data_id"] + data["n_data_tokens"], (n, pairs), generator=gen)
    active = codes[x] > 0  # [n, pairs, n_features]
    pick = torch.multinomial(active.view(-1, active.shape[-1]).float(), 1, generator=gen).view(n, pairs)
    ids = torch.full((n, data["seq_len"]), data["bos_id"])
    ids[:, 1::2], ids[:, 2::2] = x, data["first_name_id"] + pick
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2::2] = True
    return ids, mask


def feature_tensors(ground_truth: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions [n_features, d_model], codes [vocab, n_features]) from the ground truth.

    Directions are stored as float32 values written exactly; codes sparsely, as ``[feature, value]`` pairs per
    data token (specials have no features; name tokens are rebuilt by :func:`all_codes`).
    """
    import torch

    data = ground_truth["data"]
    directions = torch.tensor(ground_truth["directions"], dtype=torch.float32)
    data_codes = torch.zeros(data["n_data_tokens"], len(directions))
    for row, pairs in zip(data_codes, ground_truth["data_codes"], strict=True):
        for feature, value in pairs:
            row[int(feature)] = value
    return directions, all_codes(data_codes, data["first_data_id"])


def train(out_dir: Path, seed: int) -> dict[str, Any]:
    """Construct and train the toy-superposition organism into ``out_dir``; return training figures."""
    import torch

    from lsi.organisms.training import build_word_tokenizer, new_model, save_organism, seed_everything, train_lm

    gen = seed_everything(seed)
    words = [f"x{i}" for i in range(N_DATA_TOKENS)] + [f"f{i}" for i in range(N_FEATURES)]
    tok = build_word_tokenizer(words)
    n_specials = tok.get_vocab()["x0"]
    data = {"seq_len": SEQ_LEN, "n_data_tokens": N_DATA_TOKENS, "bos_id": tok.bos_token_id, "first_data_id": n_specials,
            "first_name_id": tok.convert_tokens_to_ids("f0")}
    directions = torch.nn.functional.normalize(torch.randn(N_FEATURES, D_MODEL, generator=gen), dim=-1)
    data_codes = make_codes(gen)
    codes = all_codes(data_codes, n_specials)
    model = new_model("gpt2", tok, n_positions=SEQ_LEN, n_embd=D_MODEL, n_layer=1, n_head=4, n_inner=4 * D_MODEL,
                      tie_word_embeddings=False)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(codes @ directions)
        model.transformer.wpe.weight.zero_()
    model.transformer.wte.weight.requires_grad_(False)
    model.transformer.wpe.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    figures = train_lm(model, lambda _s: sample_batch(data, codes, BATCH, gen), STEPS, LR, params=trainable, warmup=100)
    save_organism(model, tok, {
        "organism": "toy_superposition",
        "truth_by": "construction",
        "site": SITE,
        "n_features": N_FEATURES,
        "d_model": D_MODEL,
        "hierarchy": hierarchy(),
        "directions": directions.tolist(),
        "data_codes": [[[f, row[f].item()] for f in row.nonzero().flatten().tolist()] for row in data_codes],
        "features_doc": "directions [n_features, d_model] (unit rows); data_codes: [feature, value] pairs per "
                        "data token; name token f_i: feature i (and its parent, for a child) at 1.0; "
                        "site activation of token t = codes[t] @ directions",
        "metric": "name-token prediction: the top-k name logits (k = active features of x) are x's features",
        "data": data,
        "seed": seed,
    }, out_dir)
    return figures | {"seed": seed}


def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Check that the site equals the linear map of the codes exactly, that the directions are recovered from the
    embedding matrix, that the hierarchy holds, and that the model reads the features out of superposition."""
    import torch

    directions, codes = feature_tensors(ground_truth)
    data = ground_truth["data"]
    ids, mask = sample_batch(data, codes, 256, torch.Generator().manual_seed(1234))
    cache = lm.run_with_cache(ids, sites=[ground_truth["site"]])
    site_error = (cache[ground_truth["site"]].float() - codes[ids] @ directions).abs().max().item()
    with torch.no_grad():
        logits = lm.forward(ids)
        embedding = lm.model.get_input_embeddings().weight.float()
        recovered = torch.linalg.lstsq(codes, embedding).solution  # the codes have full column rank
    direction_error = (recovered - directions).abs().max().item()
    parent_of = {int(c): p for c, p in ground_truth["hierarchy"]["parent_of"].items()}
    active = codes > 0
    orphans = sum(int((active[:, c] & ~active[:, p]).sum()) for c, p in parent_of.items())
    names = logits[:, :-1][mask[:, 1:]][:, data["first_name_id"] : data["first_name_id"] + codes.shape[1]]
    x_active = active[ids[:, :-1][mask[:, 1:]]]
    k = x_active.sum(-1)
    top = names.argsort(-1, descending=True)
    set_hits = [bool(x_active[i, top[i, : k[i]]].all()) for i in range(len(k))]
    gram = directions @ directions.T - torch.eye(len(directions))
    checks = (
        Check(f"max |{ground_truth['site']} - codes @ directions|", site_error, 1e-5, higher_is_better=False),
        Check("max |directions recovered from the embedding matrix by least squares - true|", direction_error, 1e-4,
              higher_is_better=False),
        Check("children active without their parent (count)", float(orphans), 0.0, higher_is_better=False),
        Check("features outnumber dimensions (n_features / d_model)", len(directions) / directions.shape[1], 1.5),
        Check("active-feature set read out exactly (fraction)", sum(set_hits) / len(set_hits), 0.9),
    )
    per_token = active[data["first_data_id"] : data["first_name_id"]].sum(-1).float()
    details = {"max_abs_cos_between_directions": gram.abs().max().item(),
               "mean_active_features_per_data_token": per_token.mean().item()}
    return VerifyReport("toy_superposition", checks, details)


ORGANISM = Organism(
    name="toy_superposition",
    summary="1-layer GPT-2 whose embeddings are 64 sparse hierarchical features in 32 dims (exact codes stored)",
    family="gpt2",
    truth_by="construction",
    train=train,
    verify=verify,
    seed=0,
)
