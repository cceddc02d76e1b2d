"""Recipes: data → locate → steer → select under a side-effect budget on dev → evaluate on test → record → export.

A :class:`Recipe` is registered once (one module per scenario, listed in :mod:`lsi.improve.registry`) and run by
:func:`run_recipe`, which loads the model, the data (built-in for the organisms it knows, or the user's JSONL),
opens the run directory (resuming an interrupted run) and writes ``result.json``.

Example:
    >>> get_recipe("safety").area
    'alignment'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lsi.errors import InputError
from lsi.improve.config import RecipeConfig, build_config
from lsi.improve.record import Result
from lsi.improve.rundir import Checkpoint, Identity, RunDirectory

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

T = TypeVar("T")


class Progress:
    """What a run tells its user: ``echo`` gets one line per step (``None``: silent); ``bars`` shows a progress
    bar (tqdm, on stderr) over long loops."""

    def __init__(self, echo: Callable[[str], None] | None = None, *, bars: bool = False) -> None:
        self.echo = echo
        self.bars = bars

    def message(self, text: str) -> None:
        if self.echo is not None:
            self.echo(text)

    def iterate(self, items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
        """``items``, with a progress bar when bars are on."""
        if not self.bars:
            yield from items
            return
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False)


@dataclass
class RunContext:
    """What a recipe's ``run`` gets: the model, the config, the data, the run directory and progress."""

    lm: LanguageModel
    config: Any
    data: Any
    run: RunDirectory
    progress: Progress = field(default_factory=Progress)

    def step(self, name: str, compute: Callable[[], Checkpoint]) -> Checkpoint:
        """A resumable step (see :meth:`RunDirectory.step`), announced to the user."""
        if self.run.done(name):
            self.progress.message(f"  {name}: finished earlier, read back")
            return self.run.step(name, compute)
        self.progress.message(f"  {name} ...")
        start = time.perf_counter()
        checkpoint = self.run.step(name, compute)
        self.progress.message(f"  {name}: done in {time.perf_counter() - start:.1f} s")
        return checkpoint


# data loader: (model spec, model, user data file or None, config) -> (data, {data set name: sha256})
DataLoader = Callable[[str, "LanguageModel", "Path | None", Any], tuple[Any, dict[str, str]]]


@dataclass(frozen=True)
class Recipe:
    """A scenario's recipe: ``run(context) -> Result``; ``load_data`` gives the built-in data for the models in
    ``builtin_models`` or reads the user's JSONL (documented by ``data_schema``); ``default_model`` is what the
    main job runs it on."""

    name: str
    area: str
    summary: str
    config: type[RecipeConfig]
    load_data: DataLoader
    run: Callable[[RunContext], Result]
    default_model: str
    builtin_models: tuple[str, ...]
    data_schema: str


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to :data:`RECIPES` (a name is registered once)."""
    if recipe.name in RECIPES:
        raise InputError("a recipe name not yet registered", repr(recipe.name), "choose another name")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The recipe of scenario ``name``; :class:`InputError` listing the scenarios otherwise."""
    from lsi.improve.registry import load_recipes

    load_recipes()
    if name not in RECIPES:
        raise InputError(f"a scenario among {sorted(RECIPES)}", repr(name), "run `lsi improve --list`")
    return RECIPES[name]


def load_model(spec: str, **kwargs: Any) -> LanguageModel:
    """An organism by name (its committed weights), else :func:`lsi.load` of a hub id or local directory."""
    from lsi.organisms.registry import ORGANISMS, load_organism

    if spec in ORGANISMS:
        return load_organism(spec, **kwargs)
    import lsi

    return lsi.load(spec, **kwargs)


def run_recipe(scenario: str, model: str, out: str | Path, *, config: RecipeConfig | Mapping[str, Any] | None = None,
               data: str | Path | None = None, restart: bool = False, progress: Progress | None = None,
               lm: LanguageModel | None = None) -> Result:
    """Run scenario ``scenario`` on ``model`` (an organism name, a local directory or a hub id; or pass the loaded
    ``lm`` too) into the run directory ``out`` and return its result (also written to ``out/result.json``).

    ``config``: the recipe's config object or a mapping of its keys; ``data``: a JSONL file in the recipe's schema
    (default: the built-in data of ``model``); ``restart``: discard an earlier run in ``out`` instead of resuming.
    """
    recipe = get_recipe(scenario)
    if isinstance(config, RecipeConfig):
        if not isinstance(config, recipe.config):
            raise InputError(f"a {recipe.config.__name__} (or a mapping of its keys)", type(config).__name__,
                             f"build the config with lsi.improve.{recipe.name}.{recipe.config.__name__}(...)")
        cfg = config
    else:
        cfg = build_config(recipe.config, dict(config or {}))
    from lsi.core.identity import ModelIdentity

    progress = progress or Progress()
    progress.message(f"[{recipe.name}] loading {model}")
    lm = lm if lm is not None else load_model(model)
    dataset, hashes = recipe.load_data(model, lm, None if data is None else Path(data), cfg)
    identity = Identity(recipe.name, recipe.name, model, cfg.to_json(), hashes)
    run = RunDirectory.open(out, identity, description=recipe.summary, restart=restart,
                            model_info={"family": lm.family, "identity": ModelIdentity.of(lm).to_json()},
                            extra={"area": recipe.area})
    progress.message(f"[{recipe.name}] running into {run.path}")
    result = recipe.run(RunContext(lm, cfg, dataset, run, progress))
    run.write_result(result.to_json())
    return result
