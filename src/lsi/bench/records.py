"""The ground-truth benchmark's result as typed, versioned records.

A :class:`BenchmarkRun` holds the side that ran (locate, steer, edit); each side a record per task; each task a
record per method, or :class:`Skipped` with the reason. Every record has ``to_json()`` and ``from_json()``; the
JSON of a run carries :data:`SCHEMA_VERSION` and keeps the locate side's keys at the top level, the steer side
under ``"steer"`` and the edit side under ``"edit"``. :mod:`lsi.report` renders them.

Example:
    >>> run = LocateRun(tasks=(), skipped_organisms={"toy_superposition": "no locate task"})
    >>> LocateRun.from_json(run.to_json()) == run
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from lsi.errors import InputError
from lsi.evaluation.edit import CaseScores
from lsi.evaluation.steer import CurvePoint, SteerScores

SCHEMA_VERSION = 3  # 2: the steer side (under "steer" in a run's JSON); 3: the edit side (under "edit")
Json = dict[str, Any]


@dataclass(frozen=True)
class Skipped:
    """A method that does not apply to a task, and why."""

    reason: str

    def to_json(self) -> Json:
        return {"skipped": self.reason}


def _methods_json(methods: Mapping[str, Any]) -> Json:
    return {name: result.to_json() for name, result in methods.items()}


def _methods_from(data: Mapping[str, Json], read: Any) -> dict[str, Any]:
    return {name: Skipped(r["skipped"]) if "skipped" in r else read(r) for name, r in data.items()}


def _check_schema(data: Mapping[str, Any]) -> None:
    if data.get("schema") != SCHEMA_VERSION:
        raise InputError(f"a benchmark result of schema {SCHEMA_VERSION}", f"schema {data.get('schema')!r}",
                         "rerun `lsi bench groundtruth --json PATH` with this version of lsi")


class TaskRecord(Protocol):
    def to_json(self) -> Json: ...


T = TypeVar("T", bound=TaskRecord)
R = TypeVar("R", bound="SideRun[Any]")


@dataclass(frozen=True)
class SideRun(Generic[T]):
    """One side of a run: a record per task (of type ``task_record``) and the organisms skipped, with why."""

    task_record: ClassVar[Any]
    tasks: tuple[T, ...]
    skipped_organisms: dict[str, str]

    def to_json(self) -> Json:
        return {"schema": SCHEMA_VERSION, "tasks": [t.to_json() for t in self.tasks],
                "skipped_organisms": self.skipped_organisms}

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        _check_schema(data)
        return cls(tuple(cls.task_record.from_json(t) for t in data["tasks"]), dict(data["skipped_organisms"]))


# -- locate side ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocateGrades:
    """One method's grades on a task (means over its draws), its seconds per draw and optional extras."""

    r_precision: float
    auroc: float
    average_precision: float
    spearman_vs_oracle: float
    seconds: float
    extras: Json | None = None

    def to_json(self) -> Json:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"}
        return out if self.extras is None else {**out, "extras": self.extras}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocateGrades:
        return cls(**data)


@dataclass(frozen=True)
class LocateTaskResult:
    organism: str
    task: str
    description: str
    universe_size: int
    planted: tuple[str, ...]
    planted_are_least_important: bool
    oracle_scores: dict[str, float]
    oracle_margin: float
    methods: dict[str, LocateGrades | Skipped]

    def to_json(self) -> Json:
        return {"organism": self.organism, "task": self.task, "description": self.description,
                "universe_size": self.universe_size, "planted": list(self.planted),
                "planted_are_least_important": self.planted_are_least_important,
                "oracle_scores": self.oracle_scores, "oracle_margin": self.oracle_margin,
                "methods": _methods_json(self.methods)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocateTaskResult:
        return cls(**{**data, "planted": tuple(data["planted"]),
                      "methods": _methods_from(data["methods"], LocateGrades.from_json)})


@dataclass(frozen=True)
class LocateRun(SideRun[LocateTaskResult]):
    """The locate side: graded locate methods per task."""

    task_record = LocateTaskResult


# -- steer side -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SteerMethodResult:
    """Every draw's curve on the test split, the best point within the KL budget (the mean over the draws that
    have one, settings ``{"mean_of_draws": n}`` when several do), and the seconds per draw."""

    best: CurvePoint | None
    draws_within_budget: int
    curves: tuple[tuple[CurvePoint, ...], ...]
    seconds: float

    def to_json(self) -> Json:
        return {"best": None if self.best is None else self.best.to_json(),
                "draws_within_budget": self.draws_within_budget,
                "curves": [[p.to_json() for p in curve] for curve in self.curves], "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SteerMethodResult:
        best = None if data["best"] is None else CurvePoint.from_json(data["best"])
        curves = tuple(tuple(CurvePoint.from_json(p) for p in curve) for curve in data["curves"])
        return cls(best, data["draws_within_budget"], curves, data["seconds"])


@dataclass(frozen=True)
class SteerTaskResult:
    organism: str
    task: str
    goal: str
    description: str
    tau: float
    metrics: dict[str, str]
    unsteered: CurvePoint
    unsteered_seconds: float
    oracle: SteerScores | None
    oracle_note: str
    methods: dict[str, SteerMethodResult | Skipped]

    def to_json(self) -> Json:
        return {"organism": self.organism, "task": self.task, "goal": self.goal, "description": self.description,
                "tau": self.tau, "metrics": self.metrics,
                "unsteered": {**self.unsteered.to_json(), "seconds": self.unsteered_seconds},
                "oracle": None if self.oracle is None else asdict(self.oracle), "oracle_note": self.oracle_note,
                "methods": _methods_json(self.methods)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SteerTaskResult:
        oracle = None if data["oracle"] is None else SteerScores(**data["oracle"])
        return cls(data["organism"], data["task"], data["goal"], data["description"], data["tau"],
                   dict(data["metrics"]), CurvePoint.from_json(data["unsteered"]), data["unsteered"]["seconds"],
                   oracle, data["oracle_note"], _methods_from(data["methods"], SteerMethodResult.from_json))


@dataclass(frozen=True)
class SteerRun(SideRun[SteerTaskResult]):
    """The steer side: success-vs-KL curves per task and method."""

    task_record = SteerTaskResult


# -- edit side ------------------------------------------------------------------------------------------------------
_CASE_FIELDS = tuple(f.name for f in fields(CaseScores))


@dataclass(frozen=True)
class EditRow:
    """One graded row: the means over the requests (:func:`lsi.evaluation.edit.summarize`), a summary of the
    settings, the seconds per request, and each request's scores with its settings."""

    means: dict[str, float]
    settings: Json
    seconds: float
    per_case: tuple[tuple[CaseScores, Json], ...]

    def to_json(self) -> Json:
        return {**self.means, "settings": self.settings, "seconds": self.seconds,
                "per_case": [{**asdict(scores), **extra} for scores, extra in self.per_case]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EditRow:
        means = {k: v for k, v in data.items() if k not in ("settings", "seconds", "per_case")}
        per_case = tuple((CaseScores(**{k: c[k] for k in _CASE_FIELDS}),
                          {k: v for k, v in c.items() if k not in _CASE_FIELDS}) for c in data["per_case"])
        return cls(means, dict(data["settings"]), data["seconds"], per_case)


@dataclass(frozen=True)
class EditMethodResult:
    rows: dict[str, EditRow]

    def to_json(self) -> Json:
        return {"rows": {name: row.to_json() for name, row in self.rows.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EditMethodResult:
        return cls({name: EditRow.from_json(row) for name, row in data["rows"].items()})


@dataclass(frozen=True)
class EditTaskResult:
    organism: str
    task: str
    description: str
    metrics: dict[str, str]
    planted_layer: int | None
    requests: tuple[Json, ...]
    unedited: EditRow
    methods: dict[str, EditMethodResult | Skipped]

    def to_json(self) -> Json:
        return {"organism": self.organism, "task": self.task, "description": self.description,
                "metrics": self.metrics, "planted_layer": self.planted_layer, "requests": list(self.requests),
                "unedited": self.unedited.to_json(), "methods": _methods_json(self.methods)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EditTaskResult:
        return cls(data["organism"], data["task"], data["description"], dict(data["metrics"]),
                   data["planted_layer"], tuple(data["requests"]), EditRow.from_json(data["unedited"]),
                   _methods_from(data["methods"], EditMethodResult.from_json))


@dataclass(frozen=True)
class EditRun(SideRun[EditTaskResult]):
    """The edit side: knowledge-editing scores per task and method."""

    task_record = EditTaskResult


# -- a whole run ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchmarkRun:
    """The sides that ran (``kinds``) and their records (``None`` for a side that did not run)."""

    kinds: tuple[str, ...]
    locate: LocateRun | None = None
    steer: SteerRun | None = None
    edit: EditRun | None = None

    def to_json(self) -> Json:
        out: Json = {"schema": SCHEMA_VERSION, "kinds": list(self.kinds)}
        if self.locate is not None:
            out.update(self.locate.to_json())
        if self.steer is not None:
            out["steer"] = self.steer.to_json()
        if self.edit is not None:
            out["edit"] = self.edit.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchmarkRun:
        _check_schema(data)
        kinds = tuple(data["kinds"])
        return cls(kinds, LocateRun.from_json(data) if "locate" in kinds else None,
                   SteerRun.from_json(data["steer"]) if "steer" in kinds else None,
                   EditRun.from_json(data["edit"]) if "edit" in kinds else None)
