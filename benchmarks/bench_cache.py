"""Benchmark: the cost of lsi's selective caching against a plain HF forward and hand-written PyTorch hooks.

For each model (a random GPT-2-small-shaped model built from a ``GPT2Config``, and the real checkpoint
``../shared/models/stories260k``) and the same weights and token ids, it times:

  hf forward (sdpa)          ``model(input_ids=ids, attention_mask=ones, use_cache=False)`` (the call lsi makes)
  raw hooks: resid_post      ``register_forward_hook`` on every decoder layer, storing its output
  lsi: resid_post            ``lm.run_with_cache(ids, sites="blocks.*.resid_post")``
  hf forward (eager)         the plain forward again, eager attention (needed for attention patterns)
  raw hooks: all sites       hooks capturing the equivalent of every site (layer in/out, attention out and
                             weights, o_proj input, q/k/v projection outputs, MLP activation input, down-proj
                             input, MLP out, final norm, lm_head), detached tensors, no reshaping
  raw hooks: all + derived   the same, plus what lsi computes rather than captures: resid_mid
                             (resid_pre + attn.out) and attn.head_out (z split by head @ W_O split by head)
  lsi: all sites             ``lm.run_with_cache(ids, sites=lm.available_sites())`` (eager)

Runs are interleaved (one round = every condition once, the order rotated each round) so that load changes on a
shared machine hit all conditions alike; each number is the median over the timed rounds after warm-up rounds.
Memory: the bytes of the cached tensors (sum of numel * element_size) and the bytes of the distinct storages they
keep alive (views such as GPT-2's q/k/v slices of the fused projection keep the whole storage); on CUDA also the
peak allocation above the weights (``torch.cuda.max_memory_allocated``).

Usage:
    python benchmarks/bench_cache.py [--quick] [--json PATH] [--device cpu|cuda] [--threads N]
                                     [--repeats N] [--warmup N] [--models gpt2,stories260k,overhead]
                                     [--gpt2 BxT] [--stories BxT] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lsi
from lsi.arch.dims import get_module, linear_weight

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260k"

# (batch, seq) per model; --quick uses the second set
SIZES = {"gpt2": (2, 128), "stories260k": (16, 256), "overhead": (1, 8)}
QUICK_SIZES = {"gpt2": (1, 32), "stories260k": (4, 64), "overhead": (1, 8)}
# (warm-up, timed) rounds; one round runs every condition once. "overhead" is stories260k on 8 tokens, where
# the forward costs ~1 ms and per-call Python costs show: its rounds are cheap, so it gets many.
ROUNDS = {"gpt2": (1, 5), "stories260k": (1, 9), "overhead": (5, 60)}
QUICK_ROUNDS = {"gpt2": (1, 3), "stories260k": (1, 5), "overhead": (3, 30)}

Store = dict[str, torch.Tensor]


# -- helpers ------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(values: Store) -> tuple[int, int]:
    """(logical bytes of the tensors, bytes of the distinct storages they keep alive)."""
    logical = sum(t.numel() * t.element_size() for t in values.values())
    storages: dict[tuple[str, int], int] = {}
    for t in values.values():
        s = t.untyped_storage()
        storages[(str(t.device), s.data_ptr())] = s.nbytes()
    return logical, sum(storages.values())


def hf_call(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """The exact call ``LanguageModel.run_with_cache`` makes for an unpadded batch."""
    return model(input_ids=ids, attention_mask=mask, use_cache=False)


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


# -- raw PyTorch baselines ------------------------------------------------------------------------------------------

def raw_resid_post(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor) -> Store:
    """What one writes by hand to get every resid_post: a forward hook per decoder layer, removed after."""
    store: Store = {}

    def make(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            store[f"blocks.{i}.resid_post"] = _first(out).detach()
        return hook

    handles = [layer.register_forward_hook(make(i)) for i, layer in enumerate(layers)]
    try:
        out = hf_call(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    store["_logits"] = out.logits
    return store


class RawAllSites:
    """Hand-written hooks capturing the equivalent of every lsi site (module paths looked up once, up front)."""

    def __init__(self, lm: Any, *, derived: bool) -> None:
        spec, dims, model = lm.spec, lm.dims, lm.model
        self.model = model
        self.derived = derived
        self.final_norm = get_module(model, spec.final_norm)
        self.unembed = get_module(model, spec.unembed)
        self.per_layer = []
        for i in range(dims.n_layers):
            layer = get_module(model, spec.layer_path(i))
            o_proj = get_module(layer, spec.o_proj)
            if spec.q_proj is not None:
                qkv = [(n, get_module(layer, p)) for n, p in (("q", spec.q_proj), ("k", spec.k_proj),
                                                             ("v", spec.v_proj)) if p is not None]
            else:
                assert spec.qkv_proj is not None
                qkv = [("qkv", get_module(layer, spec.qkv_proj))]
            # W_O split by head, [n_heads, d_head, d_model]; computed once, as hand-written code would
            w_o = linear_weight(o_proj, spec.conv1d).T.unflatten(0, (dims.n_heads, dims.d_head))
            self.per_layer.append(dict(
                layer=layer, attn=get_module(layer, spec.attn), attn_out=get_module(layer, spec.attn_out),
                o_proj=o_proj, qkv=qkv, act=get_module(layer, spec.mlp_act),
                down=get_module(layer, spec.mlp_down), mlp_out=get_module(layer, spec.mlp_out), w_o=w_o))
        self.n_heads = dims.n_heads

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> Store:
        store: Store = {}
        handles = []
        derived = self.derived

        def post(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                store[name] = _first(out).detach()
            return hook

        def pre(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any) -> None:
                store[name] = args[0].detach()
            return hook

        for i, m in enumerate(self.per_layer):
            p = f"blocks.{i}."

            def layer_pre(module: nn.Module, args: Any, kwargs: Any, p: str = p) -> None:
                store[p + "resid_pre"] = _layer_input(args, kwargs).detach()

            def attn_post(module: nn.Module, args: Any, out: Any, p: str = p, same: bool = m["attn"] is m["attn_out"]
                          ) -> None:
                store[p + "attn.pattern"] = out[1].detach()
                if same:
                    store[p + "attn.out"] = out[0].detach()
                    if derived:
                        store[p + "resid_mid"] = store[p + "resid_pre"] + store[p + "attn.out"]

            def attn_out_post(module: nn.Module, args: Any, out: Any, p: str = p) -> None:
                store[p + "attn.out"] = _first(out).detach()
                if derived:
                    store[p + "resid_mid"] = store[p + "resid_pre"] + store[p + "attn.out"]

            def z_pre(module: nn.Module, args: Any, p: str = p, w_o: torch.Tensor = m["w_o"]) -> None:
                z = args[0].detach()
                store[p + "attn.z"] = z
                if derived:
                    store[p + "attn.head_out"] = torch.einsum("...he,hed->...hd", z.unflatten(-1, (self.n_heads, -1)),
                                                              w_o)

            handles.append(m["layer"].register_forward_pre_hook(layer_pre, with_kwargs=True))
            handles.append(m["layer"].register_forward_hook(post(p + "resid_post")))
            handles.append(m["attn"].register_forward_hook(attn_post))
            if m["attn_out"] is not m["attn"]:
                handles.append(m["attn_out"].register_forward_hook(attn_out_post))
            handles.append(m["o_proj"].register_forward_pre_hook(z_pre))
            for n, mod in m["qkv"]:
                handles.append(mod.register_forward_hook(post(f"{p}attn.{n}")))
            handles.append(m["act"].register_forward_pre_hook(pre(p + "mlp.pre")))
            handles.append(m["down"].register_forward_pre_hook(pre(p + "mlp.post")))
            handles.append(m["mlp_out"].register_forward_hook(post(p + "mlp.out")))
        handles.append(self.final_norm.register_forward_hook(post("ln_final")))
        handles.append(self.unembed.register_forward_hook(post("logits")))
        try:
            hf_call(self.model, ids, mask)
        finally:
            for h in handles:
                h.remove()
        return store


# -- models ------------------------------------------------------------------------------------------------------

def build_gpt2(device: torch.device) -> tuple[Any, Any, int]:
    """A GPT-2-small-shaped random model (sdpa) and an eager copy with the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    sdpa = GPT2LMHeadModel(cfg).eval().to(device)
    sdpa.set_attn_implementation("sdpa")
    eager = copy.deepcopy(sdpa, memo={id(p): p for p in sdpa.parameters()})  # shares every weight
    eager.set_attn_implementation("eager")
    return lsi.LanguageModel(sdpa), lsi.LanguageModel(eager), cfg.vocab_size


def build_stories(device: torch.device) -> tuple[Any, Any, int]:
    """The stories260k checkpoint, loaded twice from the same files: sdpa and eager."""
    if not STORIES.is_dir():
        raise FileNotFoundError(f"{STORIES} not found")
    sdpa = lsi.load(STORIES, device=device, attn_implementation="sdpa")
    eager = lsi.load(STORIES, device=device, attn_implementation="eager")
    return sdpa, eager, int(sdpa.model.config.vocab_size)


# -- measurement ---------------------------------------------------------------------------------------------------

CONDITIONS = [
    # key, label, attention implementation, reference raw condition (for "x raw")
    ("hf_sdpa", "hf forward", "sdpa", None),
    ("raw_resid", "raw hooks: resid_post", "sdpa", None),
    ("lsi_resid", "lsi: resid_post", "sdpa", "raw_resid"),
    ("hf_eager", "hf forward", "eager", None),
    ("raw_all", "raw hooks: all sites", "eager", None),
    ("raw_all_derived", "raw hooks: all + derived", "eager", "raw_all"),
    ("lsi_all", "lsi: all sites", "eager", "raw_all_derived"),
]


def bench_model(name: str, lm_sdpa: Any, lm_eager: Any, vocab: int, batch: int, seq: int, *, device: torch.device,
                warmup: int, repeats: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    all_sites = lm_eager.available_sites()
    raw_all = RawAllSites(lm_eager, derived=False)
    raw_all_derived = RawAllSites(lm_eager, derived=True)
    sdpa_layers = get_module(lm_sdpa.model, lm_sdpa.spec.layers)

    fns: dict[str, Callable[[], Any]] = {
        "hf_sdpa": lambda: hf_call(lm_sdpa.model, ids, mask),
        "raw_resid": lambda: raw_resid_post(lm_sdpa.model, sdpa_layers, ids, mask),
        "lsi_resid": lambda: lm_sdpa.run_with_cache(ids, sites="blocks.*.resid_post"),
        "hf_eager": lambda: hf_call(lm_eager.model, ids, mask),
        "raw_all": lambda: raw_all(ids, mask),
        "raw_all_derived": lambda: raw_all_derived(ids, mask),
        "lsi_all": lambda: lm_eager.run_with_cache(ids, sites=all_sites),
    }
    keys = [c[0] for c in CONDITIONS]
    times: dict[str, list[float]] = {k: [] for k in keys}
    peak: dict[str, int] = dict.fromkeys(keys, 0)
    mem: dict[str, dict[str, int]] = {}

    def cached(key: str, result: Any) -> Store:
        if key.startswith("hf_"):
            return {}
        if key.startswith("lsi_"):
            return {k: result.full(k) for k in result}
        return {k: v for k, v in result.items() if not k.startswith("_")}

    gc.collect()
    with torch.no_grad():
        for r in range(warmup + repeats):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in order:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                sync(device)
                gc.disable()  # as timeit does: no collector pauses inside a timed call
                try:
                    t0 = time.perf_counter()
                    result = fns[key]()
                    sync(device)
                    dt = time.perf_counter() - t0
                finally:
                    gc.enable()
                if device.type == "cuda":
                    peak[key] = max(peak[key], torch.cuda.max_memory_allocated(device) - base)
                if r >= warmup:
                    times[key].append(dt)
                if key not in mem:
                    values = cached(key, result)
                    logical, storage = tensor_bytes(values)
                    mem[key] = dict(n_tensors=len(values), cached_bytes=logical, retained_bytes=storage)
                del result

        checks = sanity_checks(lm_sdpa, lm_eager, sdpa_layers, raw_all_derived, all_sites, ids, mask)

    rows: dict[str, dict[str, Any]] = {}
    for key, label, attn, ref in CONDITIONS:
        med = statistics.median(times[key])
        hf = statistics.median(times["hf_sdpa" if attn == "sdpa" else "hf_eager"])
        row: dict[str, Any] = dict(
            label=label, attn=attn, times_s=times[key], median_ms=med * 1e3, min_ms=min(times[key]) * 1e3,
            x_hf=med / hf, x_raw=None if ref is None else med / statistics.median(times[ref]), x_raw_ref=ref,
            **mem[key])
        if device.type == "cuda":
            row["cuda_peak_extra_bytes"] = peak[key]
        rows[key] = row
    # lsi all sites against the capture-only raw hooks too, and lsi's extra time per call in ms
    rows["lsi_all"]["x_raw_capture_only"] = rows["lsi_all"]["median_ms"] / rows["raw_all"]["median_ms"]
    for key, ref in (("lsi_resid", "raw_resid"), ("lsi_all", "raw_all_derived")):
        rows[key]["extra_ms_vs_raw_median"] = rows[key]["median_ms"] - rows[ref]["median_ms"]
        rows[key]["extra_ms_vs_raw_min"] = rows[key]["min_ms"] - rows[ref]["min_ms"]
    return dict(model=name, batch=batch, seq=seq, n_sites=len(all_sites), n_layers=lm_eager.dims.n_layers,
                params=sum(p.numel() for p in lm_sdpa.model.parameters()), conditions=rows, checks=checks)


def sanity_checks(lm_sdpa: Any, lm_eager: Any, layers: nn.ModuleList, raw_all: RawAllSites, all_sites: list[Any],
                  ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """The baselines capture the same values lsi returns (so the timings compare like with like)."""
    n = lm_sdpa.dims.n_layers
    raw = raw_resid_post(lm_sdpa.model, layers, ids, mask)
    ours = lm_sdpa.run_with_cache(ids, sites="blocks.*.resid_post")
    resid_equal = all(torch.equal(raw[f"blocks.{i}.resid_post"], ours[f"blocks.{i}.resid_post"]) for i in range(n))
    logits_equal = torch.equal(ours.logits, hf_call(lm_sdpa.model, ids, mask).logits)
    raw2 = raw_all(ids, mask)
    full = lm_eager.run_with_cache(ids, sites=all_sites)
    diffs = {}
    for key in ("blocks.0.resid_mid", f"blocks.{n - 1}.attn.head_out", f"blocks.{n - 1}.attn.pattern",
                "blocks.0.mlp.post", "logits"):
        a, b = full[key], raw2[key]
        diffs[key] = float((a - b).abs().max())
    z = full[f"blocks.{n - 1}.attn.z"]
    diffs[f"blocks.{n - 1}.attn.z"] = float((z.flatten(-2) - raw2[f"blocks.{n - 1}.attn.z"]).abs().max())
    return dict(resid_post_equal_to_raw=resid_equal, logits_equal_to_hf=logits_equal,
                all_sites_max_abs_diff_vs_raw=diffs, all_sites_cached=len(full))


# -- reporting ---------------------------------------------------------------------------------------------------

def fmt_table(res: dict[str, Any], cuda: bool) -> str:
    head = ["condition", "attn", "ms/fwd", "min ms", "x HF", "x raw", "cached MB", "retained MB"]
    if cuda:
        head.append("CUDA peak MB")
    lines = [head]
    for key, _label, _attn, _ref in CONDITIONS:
        r = res["conditions"][key]
        row = [r["label"], r["attn"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['x_hf']:.2f}",
               "-" if r["x_raw"] is None else f"{r['x_raw']:.2f}",
               "-" if not r["n_tensors"] else f"{r['cached_bytes'] / 2**20:.1f}",
               "-" if not r["n_tensors"] else f"{r['retained_bytes'] / 2**20:.1f}"]
        if cuda:
            row.append(f"{r['cuda_peak_extra_bytes'] / 2**20:.1f}")
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        cells = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(line)]
        out.append("| " + " | ".join(cells) + " |")
        if j == 0:
            out.append("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
                       + "|")
    return "\n".join(out)


def _shape(bt: tuple[int, int]) -> str:
    return f"{bt[0]}x{bt[1]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs and few repeats (< 30 s on 2 CPU cores)")
    ap.add_argument("--json", type=Path, help="write every number to this JSON file")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--repeats", type=int, help="timed rounds for every model (default: per model, see ROUNDS)")
    ap.add_argument("--warmup", type=int, help="untimed rounds first, for every model (default: per model)")
    ap.add_argument("--models", default="gpt2,stories260k,overhead",
                    help="comma-separated: gpt2, stories260k, overhead (stories260k on 1x8 tokens)")
    ap.add_argument("--gpt2", metavar="BxT", help=f"GPT-2 batch x tokens (default {_shape(SIZES['gpt2'])}, "
                    f"--quick {_shape(QUICK_SIZES['gpt2'])})")
    ap.add_argument("--stories", metavar="BxT", help=f"stories260k batch x tokens (default "
                    f"{_shape(SIZES['stories260k'])}, --quick {_shape(QUICK_SIZES['stories260k'])})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: stable on a shared, loaded machine; 0 = torch's default)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, cProfile lsi caching on each model and print the top entries")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    sizes = dict(QUICK_SIZES if args.quick else SIZES)
    for name, given in (("gpt2", args.gpt2), ("stories260k", args.stories)):
        if given:
            try:
                b, t = (int(x) for x in given.lower().split("x"))
            except ValueError:
                ap.error(f"expected BxT (e.g. 4x128), got {given!r}")
            sizes[name] = (b, t)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in SIZES:
            ap.error(f"unknown model {m!r}; choose from {', '.join(SIZES)}")

    env = dict(python=platform.python_version(), torch=torch.__version__,
               transformers=__import__("transformers").__version__, lsi=lsi.__version__, device=str(device),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), machine=platform.machine(),
               cuda_device=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               quick=args.quick, threads_arg=args.threads)
    print(f"torch {env['torch']}, transformers {env['transformers']}, lsi {env['lsi']}, device {device}"
          f"{' (' + env['cuda_device'] + ')' if env['cuda_device'] else ''}, {env['cpu_count']} CPUs, "
          f"{env['torch_threads']} torch thread(s); per model: warm-up + timed rounds, medians of the timed ones")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    results = []
    built: dict[str, tuple[Any, Any, int]] = {}  # "overhead" reuses the stories260k models
    for i, name in enumerate(models):
        t0 = time.perf_counter()
        source = "gpt2" if name == "gpt2" else "stories260k"
        if source not in built:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built[source] = build_gpt2(device) if source == "gpt2" else build_stories(device)
        lm_sdpa, lm_eager, vocab = built[source]
        batch, seq = sizes[name]
        w, n = (QUICK_ROUNDS if args.quick else ROUNDS)[name]
        w = w if args.warmup is None else args.warmup
        n = n if args.repeats is None else args.repeats
        res = bench_model(name, lm_sdpa, lm_eager, vocab, batch, seq, device=device, warmup=w, repeats=n)
        res.update(warmup=w, repeats=n)
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        c = res["checks"]
        title = "overhead (stories260k)" if name == "overhead" else name
        print(f"\n## {title}: {res['params'] / 1e6:.2f}M params, {res['n_layers']} layers, batch {batch} x {seq} "
              f"tokens, {res['n_sites']} sites in 'all sites', {w} + {n} rounds ({res['wall_s']:.0f} s)")
        print(fmt_table(res, device.type == "cuda"))
        r = res["conditions"]
        ra, rr = r["lsi_all"], r["lsi_resid"]
        print(f"lsi minus raw hooks, per call (median / min): resid_post {rr['extra_ms_vs_raw_median']:+.1f} / "
              f"{rr['extra_ms_vs_raw_min']:+.1f} ms; all sites {ra['extra_ms_vs_raw_median']:+.1f} / "
              f"{ra['extra_ms_vs_raw_min']:+.1f} ms; lsi all sites vs raw capture-only hooks "
              f"x{ra['x_raw_capture_only']:.2f}")
        print(f"checks: resid_post equal to raw hooks: {c['resid_post_equal_to_raw']}, logits equal to HF: "
              f"{c['logits_equal_to_hf']}, all-sites max |lsi - raw| = "
              f"{max(c['all_sites_max_abs_diff_vs_raw'].values()):.2g}")
        if args.profile:
            profile_lsi(lm_eager, vocab, batch, seq, device)
        del lm_sdpa, lm_eager
        if not any(m == source or (source == "stories260k" and m == "overhead") for m in models[i + 1:]):
            del built[source]
    total = time.perf_counter() - t_start
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\ntotal {total:.0f} s; load average before/after: "
          f"{load_before[0] if load_before else 'n/a'} / {load_after[0] if load_after else 'n/a'}")
    print("x HF: time / plain HF forward with the same attention implementation; x raw: lsi resid_post / raw "
          "resid_post hooks, lsi all sites / raw all + derived, raw all + derived / raw all.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(env=env, load_avg_1min=[load_before and load_before[0],
                                                                      load_after and load_after[0]],
                                             total_s=total, results=results), indent=2))
        print(f"wrote {args.json}")
    return 0


def profile_lsi(lm: Any, vocab: int, batch: int, seq: int, device: torch.device) -> None:
    """cProfile of lsi's caching (resid_post, then every site; eager model), to see where any overhead goes."""
    import cProfile
    import pstats

    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    for label, sites in (("blocks.*.resid_post", "blocks.*.resid_post"), ("all sites", lm.available_sites())):
        with torch.no_grad():
            t0 = time.perf_counter()
            lm.run_with_cache(ids, sites=sites)
            calls = max(3, min(300, int(2.0 / (time.perf_counter() - t0))))  # about 2 s of calls
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                lm.run_with_cache(ids, sites=sites)
            prof.disable()
        print(f"\nprofile: {calls} x lsi run_with_cache({label}), top 20 by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    sys.exit(main())
