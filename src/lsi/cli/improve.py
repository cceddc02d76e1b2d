"""``lsi improve`` and ``lsi report``: run the Improve recipes into run directories and render their HTML report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


def _threads(threads: int | None, model: str | None) -> int:
    """1 thread for the organisms (tiny matrices: more threads only add overhead), every core for other models."""
    from lsi.organisms.registry import ORGANISMS

    if threads is not None:
        return threads
    return 1 if model is None or model in ORGANISMS else (os.cpu_count() or 1)


def _list() -> None:
    from dataclasses import fields

    from lsi.improve.registry import load_recipes

    for name, recipe in sorted(load_recipes().items()):
        click.echo(f"{name}  ({recipe.area}; built-in data: {', '.join(recipe.builtin_models)})")
        click.echo(f"  {recipe.summary}")
        click.echo(f"  --data JSONL lines: {recipe.data_schema}")
        defaults = ", ".join(f"{f.name}={f.default!r}" for f in fields(recipe.config))
        click.echo(f"  --config keys (defaults): {defaults}")


@click.command()
@click.argument("scenario", required=False)
@click.option("--model", default=None, help="Organism name, local HF directory or hub id (default: the scenario's "
                                            "built-in organism).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="YAML / TOML / JSON file of the recipe's config keys (see --list).")
@click.option("--data", "data_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="JSONL data in the scenario's schema (default: the built-in data of --model).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Run directory (default runs/SCENARIO; with no SCENARIO, the parent of one directory per "
                   "scenario, default runs).")
@click.option("--restart", is_flag=True, help="Discard an earlier run in --out instead of resuming it.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: 1 for organisms, else all).")
@click.option("--no-report", is_flag=True, help="Do not write the HTML report.")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios, their data schema and config keys.")
def improve(scenario: str | None, model: str | None, config_file: Path | None, data_file: Path | None,
            out: Path | None, restart: bool, threads: int | None, no_report: bool, list_only: bool) -> None:
    """Run an Improve scenario (locate → steer → select on dev → evaluate on test → export) into a run directory
    with an HTML report; with no SCENARIO, run every scenario on its built-in organism and write one report."""
    import torch

    from lsi.cli.errors import check_output_path
    from lsi.improve.config import read_config_file
    from lsi.improve.recipe import Progress, get_recipe, run_recipe
    from lsi.improve.record import table_text
    from lsi.improve.registry import load_recipes

    if list_only:
        _list()
        return
    if scenario is None and (model or config_file or data_file):
        raise click.UsageError("--model, --config and --data need a SCENARIO (see --list)")
    torch.set_num_threads(_threads(threads, model))
    progress = Progress(lambda line: click.echo(line, err=True), bars=sys.stderr.isatty())
    names = [get_recipe(scenario).name] if scenario else sorted(load_recipes())
    run_dirs = {name: (out or Path("runs") / name) if scenario else (out or Path("runs")) / name for name in names}
    for run_dir in run_dirs.values():
        check_output_path(run_dir, directory=True)
    configs = {name: read_config_file(config_file, name) if config_file else None for name in names}
    for name, run_dir in run_dirs.items():
        recipe = get_recipe(name)
        result = run_recipe(name, model or recipe.default_model, run_dir, config=configs[name], data=data_file,
                            restart=restart, progress=progress)
        click.echo(f"\n== {name} ({model or recipe.default_model}) -> {run_dir}\n{result.headline}\n")
        click.echo(table_text(result))
        for note in result.notes:
            click.echo(f"  - {note}")
    if not no_report:
        from lsi.report.html import write_report

        runs = list(run_dirs.values())
        target = runs[0] / "report.html" if scenario else (out or Path("runs")) / "report.html"
        click.echo(f"\nreport: {write_report(runs, target)}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="HTML file (default: RUN_DIR/report.html for one run, report.html beside the runs for several).")
@click.option("--open", "open_browser", is_flag=True, help="Open the report in the default browser.")
def report(run_dirs: tuple[Path, ...], out: Path | None, open_browser: bool) -> None:
    """Write the self-contained HTML report of one run directory, or a comparison of several."""
    from lsi.report.html import write_report

    target = out or (run_dirs[0] / "report.html" if len(run_dirs) == 1 else run_dirs[0].parent / "report.html")
    path = write_report(list(run_dirs), target)
    click.echo(str(path))
    if open_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
