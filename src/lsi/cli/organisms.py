"""``lsi organisms``: list, verify and retrain the model organisms. Torch is imported inside the commands."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from lsi.organisms.base import Organism, VerifyReport


def _names() -> list[str]:
    from lsi.organisms.registry import ORGANISMS

    return sorted(ORGANISMS)


def _echo_report(report: VerifyReport, seconds: float) -> None:
    status = "PASS" if report.passed else "FAIL"
    click.echo(f"{status} {report.organism} ({seconds:.1f} s)")
    for check in report.checks:
        sign = ">=" if check.higher_is_better else "<="
        mark = "ok  " if check.passed else "FAIL"
        click.echo(f"  {mark} {check.name}: {check.value:.4g} (need {sign} {check.threshold:g})")


def _organism(name: str) -> Organism:
    """The organism called ``name``, or a usage error listing the valid names."""
    from lsi.errors import InputError
    from lsi.organisms.registry import get_organism

    try:
        return get_organism(name)
    except InputError as err:
        raise click.BadParameter(str(err), param_hint="NAME") from err


def _verify_dir(name: str, model_dir: Path | None) -> VerifyReport:
    from lsi.organisms.registry import ground_truth, load_organism

    organism = _organism(name)
    lm = load_organism(name, model_dir)
    return organism.verify(lm, ground_truth(name, model_dir))


@click.group("organisms")
def organisms() -> None:
    """Model organisms: small HF models with planted, independently verified mechanisms."""


@organisms.command("list")
def list_cmd() -> None:
    """List the registered organisms."""
    from lsi.organisms.registry import ORGANISMS

    for name in sorted(ORGANISMS):
        org = ORGANISMS[name]
        present = "weights present" if (org.weights_dir / "model.safetensors").is_file() else "no weights"
        click.echo(f"{name:20s} {org.family:9s} {present:15s} {org.summary}")


@organisms.command("verify")
@click.argument("name", required=False)
@click.option("--dir", "model_dir", type=click.Path(path_type=Path, file_okay=False),
              help="verify this directory instead of the committed weights (needs NAME)")
def verify_cmd(name: str | None, model_dir: Path | None) -> None:
    """Verify one organism (or all) against its ground truth; exit 1 if any check fails."""
    import torch

    from lsi.errors import InputError

    if model_dir is not None and name is None:
        raise click.UsageError("--dir needs an organism NAME")
    torch.set_num_threads(1)
    names = [_organism(name).name] if name else _names()
    failed = []
    for n in names:
        start = time.perf_counter()
        try:
            report = _verify_dir(n, model_dir)
        except InputError as err:
            click.echo(f"FAIL {n}: {err}")
            failed.append(n)
            continue
        _echo_report(report, time.perf_counter() - start)
        if not report.passed:
            failed.append(n)
    if failed:
        raise click.ClickException(f"verification failed: {', '.join(failed)}")


@organisms.command("train")
@click.argument("name")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="directory to write the model, tokenizer and ground_truth.json into")
@click.option("--seed", type=int, default=None, help="training seed (default: the organism's own)")
def train_cmd(name: str, out_dir: Path, seed: int | None) -> None:
    """Train organism NAME into --out, then verify the result; exit 1 if verification fails."""
    organism = _organism(name)
    figures = organism.train(out_dir, organism.seed if seed is None else seed)
    figures.pop("loss_curve", None)
    click.echo(f"trained {name} into {out_dir}: {json.dumps(figures)}")
    start = time.perf_counter()
    report = _verify_dir(organism.name, out_dir)
    _echo_report(report, time.perf_counter() - start)
    if not report.passed:
        raise click.ClickException(f"{name} trained with seed {figures.get('seed')} does not verify")
