"""Benchmark: the cost of steered generation, against plain HF generate and hand-written PyTorch hooks.

For each model (the real checkpoint ``../shared/models/stories260k``, and ``llama512``: a random Llama of width
512 with 8 layers, 8 heads / 4 key-value heads, MLP 1376, vocabulary 8192, built with ``lsi.testing.tiny_model``)
and each batch size, the same prompt ids (random, unpadded) are
generated greedily for ``--new`` tokens (``min_new_tokens`` = ``max_new_tokens``, so every condition makes the
same number of steps) under:

  hf                 plain ``model.generate`` (no lsi anywhere)
  lsi                ``lm.generate`` without steering
  lsi: add           ``with lsi.Add("blocks.{L/2}.resid_pre", v, alpha).apply(lm): lm.generate(...)``
  raw hook: add      the same addition as a user writes it: one ``register_forward_pre_hook`` on that decoder layer
  folded add         ``export.fold(lm, add)``: the addition folded into an MLP bias, plain ``model.generate``
                     (Llama gets its biases through ``config.mlp_bias``: zero gate / up / down biases in every
                     layer, so this model does a few more additions than the original)
  lsi: ablation      ``DirectionalAblation(r)``: every layer's resid_pre, attn.out and mlp.out (3 sites x L)
  raw hooks: ablation  the same projection as 3 x L hand-written hooks (layer pre-hook, attention and MLP hooks)
  folded ablation    ``export.fold(lm, ablation)`` (weight orthogonalization), plain ``model.generate``

Rounds interleave the conditions (order rotated each round) so that load changes on a shared machine hit all
alike; each number is the median of the timed rounds after warm-up rounds, with the garbage collector paused
inside a timed call. Columns: wall-clock median and minimum, wall ms per new token, ``x hf`` (the ratio of the
median to plain HF generate's in the same run), ``x hf (min)`` (the same for the minima: the least disturbed
runs), the median CPU time of the process (``time.process_time``: on a shared,
loaded machine it moves far less than the wall clock while the process waits for a core) and its ratio to HF.
``same`` checks that each condition generated the same tokens as the lsi condition it reproduces (rows equal /
rows): lsi generate vs HF, raw hooks and folded weights vs the lsi steering.

``--profile`` runs cProfile over one steered generate per lsi condition and prints the share of time inside lsi's
hooks, lsi's functions by cumulative time and the top functions by own time.

Usage:
    python benchmarks/bench_steer_generate.py [--quick] [--json PATH] [--device cpu|cuda] [--threads N]
                                              [--models stories260k,llama512] [--batches 1,8] [--new N]
                                              [--prompt N] [--repeats N] [--warmup N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lsi
from lsi.arch.dims import get_module
from lsi.steer.directional import DirectionalAblation
from lsi.steer.export import fold
from lsi.testing import tiny_model

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260k"
LLAMA512 = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1376, vocab_size=8192, max_position_embeddings=512)

CONDITIONS = [  # key, label, the lsi condition whose tokens it must reproduce
    ("hf", "hf generate", None),
    ("lsi", "lsi generate", "hf"),
    ("lsi_add", "lsi: add (1 site)", None),
    ("raw_add", "raw hook: add", "lsi_add"),
    ("fold_add", "folded add", "lsi_add"),
    ("lsi_ablate", "lsi: ablation (3 x L sites)", None),
    ("raw_ablate", "raw hooks: ablation", "lsi_ablate"),
    ("fold_ablate", "folded ablation", "lsi_ablate"),
]


# -- models -------------------------------------------------------------------------------------------------------

def build(name: str, device: torch.device) -> lsi.LanguageModel:
    if name == "stories260k":
        if not STORIES.is_dir():
            raise FileNotFoundError(f"{STORIES} not found")
        return lsi.load(STORIES, device=device)
    return lsi.LanguageModel(tiny_model("llama", **LLAMA512).to(device))


def steerings(lm: lsi.LanguageModel) -> tuple[lsi.Add, DirectionalAblation]:
    """A random addition at the middle layer's input and a random directional ablation."""
    gen = torch.Generator().manual_seed(0)
    d = lm.dims.d_model
    v, r = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    add = lsi.Add(f"blocks.{lm.dims.n_layers // 2}.resid_pre", v / v.norm(), 2.0, model=lm)
    return add, DirectionalAblation(r, model=lm)


# -- raw PyTorch baselines ------------------------------------------------------------------------------------------

def _input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_input(args: tuple[Any, ...], kwargs: dict[str, Any], value: torch.Tensor) -> tuple[Any, Any]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def raw_add_hooks(lm: lsi.LanguageModel, add: lsi.Add) -> Callable[[], list[Any]]:
    """Install-hooks function for the addition as hand-written code: ``x + alpha * v`` at one layer's input."""
    layer = get_module(lm.model, lm.spec.layer_path(int(add.site.layer)))
    delta = (add.alpha * add.vector).to(device=lm.device, dtype=lm.model.dtype)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _with_input(args, kwargs, _input(args, kwargs) + delta)

    return lambda: [layer.register_forward_pre_hook(hook, with_kwargs=True)]


def raw_ablation_hooks(lm: lsi.LanguageModel, ablation: DirectionalAblation) -> Callable[[], list[Any]]:
    """Install-hooks function for ``x - (x . r) r`` at every layer's input, attention output and MLP output."""
    r = ablation.unit.to(device=lm.device, dtype=lm.model.dtype)

    def project(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ r)[..., None] * r

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _with_input(args, kwargs, project(_input(args, kwargs)))

    def post(module: nn.Module, args: Any, out: Any) -> Any:
        return project(out) if isinstance(out, torch.Tensor) else (project(out[0]), *out[1:])

    def install() -> list[Any]:
        handles = []
        for i in range(lm.dims.n_layers):
            handles.append(get_module(lm.model, lm.spec.layer_path(i)).register_forward_pre_hook(pre, with_kwargs=True))
            for path in (lm.spec.attn_out, lm.spec.mlp_out):
                handles.append(get_module(lm.model, lm.spec.layer_path(i, path)).register_forward_hook(post))
        return handles

    return install


# -- measurement ----------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(lm: lsi.LanguageModel, batch: int, prompt: int, device: torch.device) -> torch.Tensor:
    """The seeded random prompt ids ``[batch, prompt]`` every condition generates from."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(3, lm.dims.vocab, (batch, prompt), generator=gen).to(device)


def conditions(lm: lsi.LanguageModel, ids: torch.Tensor, new: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each condition as a zero-argument call returning the generated ids ``[batch, prompt + new]``."""
    add, ablation = steerings(lm)
    folded_add, folded_ablation = fold(lm, add).model, fold(lm, ablation).model
    mask = torch.ones_like(ids)
    options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def hf(model: Any) -> Callable[[], torch.Tensor]:
        return lambda: model.generate(input_ids=ids, attention_mask=mask, pad_token_id=lm.pad_id, **options)

    def steered(steering: Any) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with steering.apply(lm):
                return lm.generate(ids, **options)
        return call

    def hooked(install: Callable[[], list[Any]]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            handles = install()
            try:
                return hf(lm.model)()
            finally:
                for h in handles:
                    h.remove()
        return call

    return {"hf": hf(lm.model), "lsi": lambda: lm.generate(ids, **options),
            "lsi_add": steered(add), "raw_add": hooked(raw_add_hooks(lm, add)), "fold_add": hf(folded_add),
            "lsi_ablate": steered(ablation), "raw_ablate": hooked(raw_ablation_hooks(lm, ablation)),
            "fold_ablate": hf(folded_ablation)}


def bench(lm: lsi.LanguageModel, batch: int, prompt: int, new: int, *, warmup: int, repeats: int,
          device: torch.device) -> dict[str, Any]:
    fns = conditions(lm, prompt_ids(lm, batch, prompt, device), new)
    keys = [c[0] for c in CONDITIONS]
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    outputs: dict[str, torch.Tensor] = {}
    gc.collect()
    with torch.no_grad():
        for r in range(warmup + repeats):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                sync(device)
                gc.disable()
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = fns[key]()
                    sync(device)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    gc.enable()
                if r >= warmup:
                    wall[key].append(dt)
                    cpu[key].append(dc)
                outputs.setdefault(key, out.cpu())
    hf_wall, hf_cpu = statistics.median(wall["hf"]), statistics.median(cpu["hf"])
    rows = {}
    for key, label, ref in CONDITIONS:
        med, med_cpu = statistics.median(wall[key]), statistics.median(cpu[key])
        same = None if ref is None else int((outputs[key] == outputs[ref]).all(1).sum())
        rows[key] = dict(label=label, wall_s=wall[key], cpu_s=cpu[key], median_ms=med * 1e3,
                         min_ms=min(wall[key]) * 1e3, cpu_median_ms=med_cpu * 1e3, x_hf=med / hf_wall,
                         x_hf_min=min(wall[key]) / min(wall["hf"]), x_hf_cpu=med_cpu / hf_cpu,
                         ms_per_token=med * 1e3 / new, same_as=ref, same_rows=same)
    assert all(o.shape == (batch, prompt + new) for o in outputs.values())
    return dict(batch=batch, prompt=prompt, new=new, warmup=warmup, repeats=repeats, conditions=rows)


def profile(lm: lsi.LanguageModel, batch: int, prompt: int, new: int, device: torch.device, top: int) -> dict:
    """cProfile one generate per lsi steered condition: the share of time inside lsi's hooks, lsi's functions by
    cumulative time, and the top functions by own time (cProfile slows Python code more than kernels, so shares
    of Python work are upper bounds)."""
    fns = conditions(lm, prompt_ids(lm, batch, prompt, device), new)
    hooks_file = os.path.join("lsi", "core", "hooks.py")
    report = {}
    for key in ("lsi_add", "lsi_ablate"):
        fns[key]()  # warm
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            fns[key]()
            prof.disable()
        entries = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        rows = [(f"{Path(f).name}:{line}:{fn}", f, fn, calls, own, cum)
                for (f, line, fn), (_, calls, own, cum, _) in entries.items()]
        total = max(r[5] for r in rows)
        # the hooks lsi installs: per-site groups (pre / post) and the forward-state pre-hook (<lambda>)
        in_hooks = sum(r[5] for r in rows if r[1].endswith(hooks_file) and r[2] in ("pre", "post", "<lambda>"))
        ours = sorted((r for r in rows if f"{os.sep}lsi{os.sep}" in r[1] and "generate" not in r[2]),
                      key=lambda r: r[5], reverse=True)[:top]
        by_own = sorted(rows, key=lambda r: r[4], reverse=True)[:top]
        report[key] = dict(total_s=total, lsi_hooks_s=in_hooks,
                           lsi_by_cumulative=[(r[0], r[3], r[4], r[5]) for r in ours],
                           top_by_own=[(r[0], r[3], r[4], r[5]) for r in by_own])
        print(f"  profile {key}: {total:.3f} s under cProfile; inside lsi's hooks {in_hooks:.3f} s "
              f"({100 * in_hooks / total:.1f}%)")
        for title, entries_ in (("lsi functions by cumulative time", ours), ("top functions by own time", by_own)):
            print(f"    {title}:")
            for name, _, _, calls, own, cum in entries_:
                print(f"      {own:7.4f} s own {cum:7.4f} s cum {calls:7d} calls  {name}")
    return report


# -- reporting --------------------------------------------------------------------------------------------------------

def fmt_table(res: dict[str, Any]) -> str:
    head = ["condition", "ms / generate", "min ms", "ms / token", "x hf", "x hf (min)", "CPU ms", "x hf (CPU)",
            "same"]
    lines = [head]
    for key, _label, _ref in CONDITIONS:
        r = res["conditions"][key]
        lines.append([r["label"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['ms_per_token']:.2f}",
                      f"{r['x_hf']:.2f}", f"{r['x_hf_min']:.2f}", f"{r['cpu_median_ms']:.1f}", f"{r['x_hf_cpu']:.2f}",
                      "-" if r["same_as"] is None else f"{r['same_rows']}/{res['batch']}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                     for i, c in enumerate(line)) + " |")
        if j == 0:
            out.append("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
                       + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 warm-up + 3 timed rounds")
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    ap.add_argument("--models", default="stories260k,llama512", help="comma-separated: stories260k, llama512")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--new", type=int, help="new tokens per generate (default 64, --quick 16)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 7, --quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed rounds first (default 2, --quick 1)")
    ap.add_argument("--profile", action="store_true", help="cProfile the lsi steered conditions after timing")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ("stories260k", "llama512"):
            ap.error(f"unknown model {m!r}; choose from stories260k, llama512")
    batches = [int(b) for b in args.batches.split(",")]
    new = args.new or (16 if args.quick else 64)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats or (3 if args.quick else 7)

    env = dict(python=platform.python_version(), torch=torch.__version__,
               transformers=__import__("transformers").__version__, lsi=lsi.__version__, device=str(device),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               cuda_device=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    print(f"torch {env['torch']}, transformers {env['transformers']}, lsi {env['lsi']}, device {device}"
          f"{' (' + env['cuda_device'] + ')' if env['cuda_device'] else ''}, {env['cpu_count']} CPUs, "
          f"{env['torch_threads']} torch thread(s); greedy, {new} new tokens after {args.prompt} prompt tokens; "
          f"{warmup} warm-up + {repeats} timed rounds, medians")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for name in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = build(name, device)
        params = sum(p.numel() for p in lm.model.parameters())
        for batch in batches:
            t0 = time.perf_counter()
            res = bench(lm, batch, args.prompt, new, warmup=warmup, repeats=repeats, device=device)
            res.update(model=name, params=params, n_layers=lm.dims.n_layers, d_model=lm.dims.d_model,
                       wall_s=time.perf_counter() - t0)
            print(f"\n## {name}: {params / 1e6:.2f}M params, {lm.dims.n_layers} layers, d_model {lm.dims.d_model}; "
                  f"batch {batch} ({res['wall_s']:.0f} s)")
            print(fmt_table(res))
            if args.profile:
                res["profile"] = profile(lm, batch, args.prompt, new, device, top=8)
            results.append(res)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nload average before / after: {load_before} / {load_after}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(env=env, load_before=load_before, load_after=load_after,
                                             results=results), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
