"""``lsi``: inspect models and run the built-in demo. Heavy imports happen inside commands (``--help`` is fast)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from lsi import __version__
from lsi.cli.bench import bench
from lsi.cli.errors import LsiGroup, check_output_path
from lsi.cli.improve import improve, report
from lsi.cli.organisms import organisms


@click.group(cls=LsiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lsi")
@click.option("--debug", is_flag=True, envvar="LSI_DEBUG",
              help="Show the full traceback of an error (default: one line with the fix).")
def cli(debug: bool) -> None:
    """lsi: Locate, Steer, Improve — mechanistic interpretability for HuggingFace language models."""
    quiet_progress_bars()


def quiet_progress_bars() -> None:
    """No download / loading progress bars (transformers reads the setting when imported: set it without
    importing transformers, which would make every command and its --help slow)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _shape_text(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def inspect_report(model: str, *, attn_implementation: str | None = None) -> dict[str, Any]:
    """Everything ``lsi inspect`` prints, as data."""
    import lsi
    from lsi.core.selfcheck import self_check

    lm = lsi.load(model, attn_implementation=attn_implementation)
    check = self_check(lm)
    sites = []
    for site in lm.available_sites():
        concrete = lm.site_shape(site)
        shape = [name if name in ("batch", "pos", "q_pos", "k_pos") else size
                 for name, size in zip(site.info.shape, concrete, strict=True)]
        sites.append({"name": str(site), "shape": shape})
    return {"model": str(model), "family": lm.family, "probed": lm.probed, **lm.dims.__dict__,
            "parallel_attn": lm.parallel_attn, "attn_implementation": lm.attn_implementation,
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "tokenizer": lm.tokenizer is not None, "sites": sites, "self_check": check.to_dict()}


def print_inspect(report: dict[str, Any]) -> None:
    click.echo(f"model      {report['model']}")
    click.echo(f"family     {report['family']}{' (probed)' if report['probed'] else ''}; "
               f"{'parallel' if report['parallel_attn'] else 'sequential'} attention; "
               f"attention implementation {report['attn_implementation']}; dtype {report['dtype']}")
    click.echo(f"dims       n_layers={report['n_layers']} d_model={report['d_model']} n_heads={report['n_heads']} "
               f"n_kv_heads={report['n_kv_heads']} d_head={report['d_head']} d_mlp={report['d_mlp']} "
               f"vocab={report['vocab']}")
    click.echo(f"tokenizer  {'yes' if report['tokenizer'] else 'none (inputs are token ids)'}")
    click.echo("sites (per-layer kinds shown for blocks.0; every layer has the same shapes)")
    for site in report["sites"]:
        name = site["name"]
        if name.startswith("blocks.") and not name.startswith("blocks.0."):
            continue
        click.echo(f"  {name.replace('blocks.0.', 'blocks.{i}.'):<24} {_shape_text(site['shape'])}")
    check = report["self_check"]
    click.echo(f"self-check {'PASSED' if check['passed'] else 'FAILED'} ({len(check['checks'])} checks)"
               + (f": {check['error']}" if check["error"] else ""))
    for c in check["checks"]:
        if not c["passed"]:
            click.echo(f"  failed: {c['name']} (value {c['value']:.3g}, tolerance {c['tolerance']:.3g})")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--attn-implementation", default=None, help="eager, sdpa, ... (default: the model's own).")
def inspect(model: str, as_json: bool, attn_implementation: str | None) -> None:
    """Show a model's family, dimensions, sites with shapes, and the self-check result."""
    report = inspect_report(model, attn_implementation=attn_implementation)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        print_inspect(report)
    if not report["self_check"]["passed"]:
        sys.exit(1)


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/demo-model"),
              show_default=True, help="Where the demo model is saved (trained once, then reused).")
@click.option("--retrain", is_flag=True, help="Train again even if the model exists.")
def demo(out_dir: Path, retrain: bool) -> None:
    """Train a small model on arithmetic sequences (CPU, ~30 s), inspect it and print a logit-lens table."""
    import lsi
    from lsi.demo import SEQ_LEN, counting_batch, train_demo_model
    from lsi.locate.vocab import logit_lens

    check_output_path(out_dir, directory=True)
    if retrain or not (out_dir / "model.safetensors").exists():
        click.echo(f"training the demo model into {out_dir} ...")
        figures = train_demo_model(out_dir)
        click.echo(f"trained {figures['steps']} steps in {figures['seconds']} s; final loss {figures['final_loss']}")
    print_inspect(inspect_report(str(out_dir)))
    lm = lsi.load(out_dir)
    ids = counting_batch(256, seed=12345)  # held-out sequences (training used other seeds)
    prompts, targets = ids[:, :SEQ_LEN], ids[:, SEQ_LEN]
    lens = logit_lens(lm, prompts)
    p_target = lens.target_probs(targets[:, None]).mean(dim=(1, 2))
    top1 = (lens.logits.argmax(-1)[..., 0] == targets).float().mean(1)
    click.echo("\nlogit lens: predicting the 12th number of 256 held-out sequences (final norm applied)")
    click.echo(f"  {'layer':<20} {'top-1 accuracy':>15} {'mean p(target)':>15}")
    for label, acc, p in zip(lens.labels, top1.tolist(), p_target.tolist(), strict=True):
        click.echo(f"  {label:<20} {acc:>15.3f} {p:>15.3f}")


cli.add_command(organisms)
cli.add_command(bench)
cli.add_command(improve)
cli.add_command(report)


def main() -> None:
    cli()
