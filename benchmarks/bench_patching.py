"""Benchmark: batched activation patching against one forward per patch, on the same models in one run.

Cases (each a model plus clean / corrupted token ids and a metric):

  stories260k   the real checkpoint ../shared/models/stories260k, random token ids; the corrupted ids change
                the token in the middle of every row
  induction     the induction organism; the first rows of its test split's clean / corrupted runs (the first
                copy of the repeated segment replaced by random tokens)

The metric is the KL divergence from the clean run's next-token distribution at the last token
(``lsi.locate.metrics.kl_to``), so F_clean = 0 and the normalized score is 1 - KL_patched / KL_corrupt.

Section ``exact``: the denoising sweep over ``blocks.*.resid_pre`` x every position, timed as

  batched   ``activation_patching(lm, clean, corrupt, metric, "blocks.*.resid_pre", positions="each")``: the
            patched runs are copies of the inputs in an expanded batch (``--batch-size`` rows per forward)
  loop      one ``lm.forward`` per (layer, position) under ``lsi.Patch(site, clean_cache, positions=p)``

and checks that both give the same normalized scores (max |difference|). Timing as in bench_cache.py: rounds
interleave the conditions (order rotated each round), the first rounds are untimed warm-up, each number is the
median of the timed rounds, and the garbage collector is paused inside a timed call.

Section ``attribution``: attribution patching (``lsi.locate.gradients.attribution_patching``: one forward of the
clean run, one forward and one backward of the corrupted run, every object at once) against exact activation
patching (the batched ``activation_patching`` above) on the same objects, denoising in both, for

  resid     ``blocks.*.resid_pre`` x every position (``positions="each"`` in both)
  heads     every attention head, ``blocks.*.attn.head_out``, all positions at once

timed in the same interleaved rounds (cost ratio exact / attribution), and their agreement: Spearman rank
correlation of the normalized scores, signed and of |score|, over the cells where either score is nonzero
(cells whose patch writes the values the corrupted run already has are exactly 0 in both; counting them would
raise the correlation for nothing), and the overlap of the top k cells by |score|, k = max(5, n // 10) of the n
cells, at most n // 2 (8 heads of the induction organism: k = 4).

The metric is the same KL as in ``exact``. KL is at its minimum at the clean run, so its gradient there is zero
and a first-order estimate in the noising direction (base = clean) is zero for every object: the section checks
this (the "noising check" line: the largest |estimate| with ``direction="noise"``, below 2e-8 against
KL_corrupt of 3e-3 to 2e-2). In the denoising direction (base = corrupted) the gradient is informative, so the
estimate is usable there and the KL metric is kept. Near its minimum KL is about quadratic, so the linear
estimate of a patch that restores most of the clean run overshoots (up to 2x; normalized scores reach 1.6-1.8
where exact patching gives about 0.95), but the ranks mostly survive. A logit difference (the clean run's top
next token vs the corrupted run's best other token at the last position) agreed no better overall: better on the
induction resid sweep, worse on its heads and on stories260k 8x32's resid sweep. On stories260k, where the
corruption rarely changes the top token, its F_clean - F_corrupt was about 1e-3.

Each section is a function ``section_NAME(case, args) -> dict`` listed in ``SECTIONS``; another comparison on
the same cases is one more function and one more entry.

Usage:
    python benchmarks/bench_patching.py [--quick] [--json PATH] [--device cpu|cuda] [--threads N]
                                        [--repeats N] [--warmup N] [--batch-size N]
                                        [--sections exact,attribution] [--stories BxT,...] [--induction B,...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import lsi
from lsi.evaluation.ranking import rank_correlation
from lsi.locate.gradients import attribution_patching
from lsi.locate.metrics import kl_to
from lsi.locate.patching import DEFAULT_BATCH_SIZE, activation_patching

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260k"

# (rows, tokens) per case; the organism's rows have 48 tokens
SIZES = {"stories260k": [(2, 16), (8, 32)], "induction": [(2, 48), (8, 48)]}
QUICK_SIZES = {"stories260k": [(2, 16)], "induction": [(2, 48)]}
ROUNDS, QUICK_ROUNDS = (1, 5), (1, 2)  # (warm-up, timed) rounds


@dataclass
class Case:
    name: str
    lm: Any
    clean: lsi.Batch
    corrupt: lsi.Batch
    metric: Any
    description: str

    @property
    def shape(self) -> str:
        return "x".join(str(n) for n in self.clean.input_ids.shape)


# -- cases ----------------------------------------------------------------------------------------------------------

def _kl_metric(lm: Any, clean: lsi.Batch) -> Any:
    return kl_to(lm.forward(clean))


def stories_cases(sizes: list[tuple[int, int]], device: torch.device) -> list[Case]:
    lm = lsi.load(STORIES, device=device)
    return [stories_case(lm, batch, tokens) for batch, tokens in sizes]


def stories_case(lm: Any, batch: int, tokens: int) -> Case:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, lm.dims.vocab, (batch, tokens), generator=gen)
    middle, n_ids = ids[:, tokens // 2], lm.dims.vocab - 3  # ids 3 .. vocab - 1
    drawn = (middle + 1 + torch.randint(0, n_ids - 1, (batch,), generator=gen)) % n_ids + 3
    # the draw can give the token back (one chance in vocab - 4) and never gives middle % n_ids + 3: swap those
    corrupt = ids.clone()
    corrupt[:, tokens // 2] = torch.where(drawn == middle, middle % n_ids + 3, drawn)
    clean_b, corrupt_b = lm.to_batch(ids), lm.to_batch(corrupt)
    return Case("stories260k", lm, clean_b, corrupt_b, _kl_metric(lm, clean_b),
                f"random ids, token {tokens // 2} changed")


def induction_cases(sizes: list[tuple[int, int]], device: torch.device) -> list[Case]:
    from lsi.organisms.registry import get_organism, ground_truth, load_organism

    lm = load_organism("induction")
    lm.model.to(device)
    split = get_organism("induction").locate_tasks(lm, ground_truth("induction"))[0].test
    assert split.clean is not None and split.corrupted is not None
    cases = []
    for batch, _ in sizes:
        clean_b = lm.to_batch(torch.as_tensor(split.clean.inputs)[:batch])
        corrupt_b = lm.to_batch(torch.as_tensor(split.corrupted.inputs)[:batch])
        cases.append(Case("induction", lm, clean_b, corrupt_b, _kl_metric(lm, clean_b),
                          "test split rows, first copy of the repeated segment randomized"))
    return cases


# -- timing ---------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    gc.collect()
    gc.disable()
    try:
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        return time.perf_counter() - start, out
    finally:
        gc.enable()


def interleaved(conditions: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run every condition once per round (order rotated); return the timed rounds' seconds and last outputs."""
    names = list(conditions)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, Any] = {}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, outputs[name] = timed(conditions[name], device)
            if r >= warmup:
                times[name].append(seconds)
    return times, outputs


# -- section: exact patching, batched vs one forward per patch ---------------------------------------------------

def loop_sweep(case: Case) -> torch.Tensor:
    """The unbatched reference: one forward per (layer, position), each under one lsi.Patch."""
    lm, metric = case.lm, case.metric
    cache = lm.run_with_cache(case.clean, "blocks.*.resid_pre")
    f_clean = float(metric(lm.forward(case.clean), case.clean))
    f_corrupt = float(metric(lm.forward(case.corrupt), case.corrupt))
    n_layers, n_pos = lm.dims.n_layers, case.clean.input_ids.shape[1]
    out = torch.empty(n_layers, n_pos)
    for layer in range(n_layers):
        for pos in range(n_pos):
            with lm.intervene(lsi.Patch(f"blocks.{layer}.resid_pre", cache, positions=pos)):
                out[layer, pos] = float(metric(lm.forward(case.corrupt), case.corrupt))
    return (out - f_corrupt) / (f_clean - f_corrupt)


def section_exact(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    def batched() -> Any:
        return activation_patching(case.lm, case.clean, case.corrupt, case.metric, "blocks.*.resid_pre",
                                   positions="each", batch_size=args.batch_size)

    times, outputs = interleaved({"batched": batched, "loop": lambda: loop_sweep(case)}, args.warmup, args.repeats,
                                 args.device)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    n_rows = case.clean.input_ids.shape[0]
    n_patches = case.lm.dims.n_layers * case.clean.input_ids.shape[1]
    runs = outputs["batched"].settings["patched_runs"]
    return {"patches": n_patches, "runs": runs, "forwards_batched": -(-runs // max(1, args.batch_size // n_rows)),
            "forwards_loop": n_patches, "batched_s": med["batched"], "loop_s": med["loop"],
            "ratio": med["loop"] / med["batched"],
            "max_abs_diff": float((outputs["batched"].scores - outputs["loop"]).abs().max()), "times": times}


def report_exact(rows: list[tuple[Case, dict[str, Any]]]) -> None:
    print("\nexact patching: resid_pre x layers x positions, denoising, batched vs one forward per patch")
    head = (f"{'model':<12} {'BxT':>6} {'patches':>7} {'run':>5} {'fwd batched':>11} {'fwd loop':>8} "
            f"{'batched s':>9} {'loop s':>8} {'loop/batched':>12} {'max|diff|':>9}")
    print(head)
    print("-" * len(head))
    for case, r in rows:
        print(f"{case.name:<12} {case.shape:>6} {r['patches']:>7} {r['runs']:>5} {r['forwards_batched']:>11} "
              f"{r['forwards_loop']:>8} {r['batched_s']:>9.3f} {r['loop_s']:>8.3f} {r['ratio']:>11.1f}x "
              f"{r['max_abs_diff']:>9.1e}")
    print("run: patched runs computed by the batched call (patches that write values the corrupted run already "
          "has are skipped: their metric is F_corrupt)")


# -- section: attribution patching vs exact activation patching ----------------------------------------------------

ATTRIBUTION_SWEEPS: dict[str, tuple[str, Literal["all", "each"]]] = {
    "resid": ("blocks.*.resid_pre", "each"),  # every layer's residual input, each position
    "heads": ("blocks.*.attn.head_out", "all"),  # every head, all positions at once
}


def top_k(n: int) -> int:
    return max(1, min(max(5, n // 10), n // 2))


def agreement(exact: torch.Tensor, approx: torch.Tensor) -> dict[str, Any]:
    """Rank agreement of two score tensors of the same cells (see the module docstring)."""
    e, a = exact.flatten().double(), approx.flatten().double()
    moving = (e != 0) | (a != 0)
    k = top_k(len(e))
    overlap = len(set(e.abs().topk(k).indices.tolist()) & set(a.abs().topk(k).indices.tolist()))
    e_moving, a_moving = e[moving].tolist(), a[moving].tolist()
    return {"cells": len(e), "compared": int(moving.sum()), "spearman": rank_correlation(e_moving, a_moving),
            "spearman_abs": rank_correlation([abs(x) for x in e_moving], [abs(x) for x in a_moving]),
            "spearman_all_cells": rank_correlation(e.tolist(), a.tolist()),
            "k": k, "top_k_overlap": overlap, "max_exact": float(e.max()), "max_attribution": float(a.max())}


def section_attribution(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    def exact(sites: str, positions: Literal["all", "each"]) -> Callable[[], Any]:
        return lambda: activation_patching(case.lm, case.clean, case.corrupt, case.metric, sites,
                                           positions=positions, batch_size=args.batch_size)

    def attribution(sites: str, positions: Literal["all", "each"]) -> Callable[[], Any]:
        return lambda: attribution_patching(case.lm, case.clean, case.corrupt, case.metric, sites,
                                            positions=positions)

    conditions: dict[str, Callable[[], Any]] = {}
    for sweep, (sites, positions) in ATTRIBUTION_SWEEPS.items():
        conditions[f"{sweep} exact"] = exact(sites, positions)
        conditions[f"{sweep} attribution"] = attribution(sites, positions)
    times, outputs = interleaved(conditions, args.warmup, args.repeats, args.device)
    out: dict[str, Any] = {}
    for sweep in ATTRIBUTION_SWEEPS:
        ex, at = outputs[f"{sweep} exact"], outputs[f"{sweep} attribution"]
        if ex.labels != at.labels:
            raise RuntimeError(f"{sweep}: exact and attribution patching label their cells differently")
        exact_s = statistics.median(times[f"{sweep} exact"])
        attribution_s = statistics.median(times[f"{sweep} attribution"])
        out[sweep] = {"exact_s": exact_s, "attribution_s": attribution_s, "ratio": exact_s / attribution_s,
                      "patched_runs": ex.settings["patched_runs"], **agreement(ex.scores, at.scores),
                      "times": {"exact": times[f"{sweep} exact"], "attribution": times[f"{sweep} attribution"]}}
    # KL sits at its minimum at the clean run: the noising estimate (base = clean) vanishes
    noise = attribution_patching(case.lm, case.clean, case.corrupt, case.metric, "blocks.*.resid_pre",
                                 positions="each", direction="noise", normalize=False)
    out["noise_max_abs_dF"] = float(noise.scores.abs().max())
    out["f_clean"], out["f_corrupt"] = noise.settings["f_clean"], noise.settings["f_corrupt"]
    return out


def report_attribution(rows: list[tuple[Case, dict[str, Any]]]) -> None:
    print("\nattribution patching vs exact activation patching, denoising, KL metric "
          "(exact = batched activation_patching)")
    head = (f"{'model':<12} {'BxT':>6} {'sweep':<6} {'cells':>5} {'cmp':>4} {'exact s':>8} {'attr s':>7} "
            f"{'exact/attr':>10} {'rho':>6} {'rho|.|':>6} {'top-k':>6} {'max ex':>7} {'max attr':>8}")
    print(head)
    print("-" * len(head))
    for case, r in rows:
        for sweep in ATTRIBUTION_SWEEPS:
            s = r[sweep]
            print(f"{case.name:<12} {case.shape:>6} {sweep:<6} {s['cells']:>5} {s['compared']:>4} "
                  f"{s['exact_s']:>8.3f} {s['attribution_s']:>7.3f} {s['ratio']:>9.1f}x {s['spearman']:>6.2f} "
                  f"{s['spearman_abs']:>6.2f} {s['top_k_overlap']:>3}/{s['k']:<2} {s['max_exact']:>7.2f} "
                  f"{s['max_attribution']:>8.2f}")
    print("resid: blocks.*.resid_pre x positions; heads: blocks.*.attn.head_out, all positions at once. cmp: cells "
          "compared (either score nonzero); rho: Spearman of the scores over them, rho|.|: of |score|; top-k: shared "
          "cells among the k largest |score|, k = max(5, cells // 10), at most cells // 2")
    print("noising check (KL is at its minimum at the clean run): largest |dF| estimated with direction='noise' vs "
          "KL_corrupt: " + ", ".join(f"{c.name} {c.shape} {r['noise_max_abs_dF']:.1e} vs {r['f_corrupt']:.1e}"
                                     for c, r in rows))


SECTIONS: dict[str, tuple[Callable[[Case, argparse.Namespace], dict[str, Any]],
                          Callable[[list[tuple[Case, dict[str, Any]]]], None]]] = {
    "exact": (section_exact, report_exact),
    "attribution": (section_attribution, report_attribution),
}


# -- main -----------------------------------------------------------------------------------------------------------

def _sizes(text: str) -> list[tuple[int, int]]:
    """``"8x32,2x16"`` -> [(8, 32), (2, 16)]; a bare ``"8"`` means 8 rows of 48 tokens (the induction rows)."""
    out = []
    for item in text.split(","):
        b, _, t = item.strip().lower().partition("x")
        out.append((int(b), int(t) if t else 48))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs and fewer rounds")
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    ap.add_argument("--repeats", type=int, help=f"timed rounds (default {ROUNDS[1]}, --quick {QUICK_ROUNDS[1]})")
    ap.add_argument("--warmup", type=int, help=f"untimed rounds first (default {ROUNDS[0]})")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per batched forward")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated from {', '.join(SECTIONS)}")
    ap.add_argument("--stories", metavar="BxT,...", help="stories260k sizes (default 2x16,8x32; --quick 2x16)")
    ap.add_argument("--induction", metavar="B,...", help="induction rows, 48 tokens each (default 2,8; --quick 2)")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    warmup, repeats = QUICK_ROUNDS if args.quick else ROUNDS
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    sizes = dict(QUICK_SIZES if args.quick else SIZES)
    for name, given in (("stories260k", args.stories), ("induction", args.induction)):
        if given:
            try:
                sizes[name] = _sizes(given)
            except ValueError:
                ap.error(f"expected sizes like 8x32,2x16 (stories260k) or 8,2 (induction), got {given!r}")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")

    env = dict(python=platform.python_version(), torch=torch.__version__,
               transformers=__import__("transformers").__version__, lsi=lsi.__version__, device=str(args.device),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), quick=args.quick,
               batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats,
               load_before=os.getloadavg() if hasattr(os, "getloadavg") else None)
    print(f"torch {env['torch']}, transformers {env['transformers']}, lsi {env['lsi']}, device {args.device}, "
          f"{env['torch_threads']} torch thread(s), {args.batch_size} rows per batched forward, "
          f"{args.warmup} + {args.repeats} rounds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [*stories_cases(sizes["stories260k"], args.device), *induction_cases(sizes["induction"], args.device)]
    for case in cases:
        print(f"  {case.name}: {case.shape} ({case.description}), {case.lm.dims.n_layers} layers")
    start = time.perf_counter()
    results: dict[str, Any] = {"env": env, "sections": {}}
    for name in sections:
        run, report = SECTIONS[name]
        rows = [(case, run(case, args)) for case in cases]
        report(rows)
        results["sections"][name] = {f"{case.name} {case.shape}": r for case, r in rows}
    env["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\n{env['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
