"""``lsi bench``: benchmarks against ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from lsi.cli.errors import check_output_path


@click.group()
def bench() -> None:
    """Benchmarks: grade methods on the model organisms' planted ground truth."""


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [n.strip() for n in value.split(",") if n.strip()]


@bench.command()
@click.option("--methods", default=None,
              help="Comma-separated locate, steer and / or edit methods (default: all registered).")
@click.option("--organisms", default=None, help="Comma-separated organisms (default: all).")
@click.option("--kind", type=click.Choice(["all", "locate", "steer", "edit"]), default="all", show_default=True,
              help="Grade locate methods, steer methods, knowledge-edit methods, or all three.")
@click.option("--tau", type=float, default=None,
              help="KL budget in nats for the steer side's best target success (default: 0.1).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the result here.")
def groundtruth(methods: str | None, organisms: str | None, kind: str, tau: float | None,
                json_path: Path | None) -> None:
    """Grade locate methods against the organisms' planted components (next to the oracle and random), steer
    methods by target success at a KL budget (next to the unsteered model, the oracle and a random direction) and
    knowledge-edit methods by efficacy, paraphrase and neighbourhood scores (next to the unedited model)."""
    from lsi.bench.groundtruth import run_benchmark, write_json
    from lsi.report.text import render

    if json_path is not None:
        check_output_path(json_path)
    result = run_benchmark(methods=_names(methods), organisms=_names(organisms), kind=kind, tau=tau)
    click.echo(render(result))
    if json_path is not None:
        write_json(result, json_path)
        click.echo(f"\nwrote {json_path}")
