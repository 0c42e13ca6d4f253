"""A campaign spec: tasks, each with its methods (a config file each), seeds and OOD tasks; the deadline, the
calibration and the overrides applied to every job; a ``smoke`` block that replaces any of these for the CPU
rehearsal (``--smoke``).

    output_dir: runs/campaign/gsm8k-smollm2
    deadline_s: 530             # the whole command, from its start, packing included
    max_concurrent: 12
    calibration: {steps: 12, levels: [1, 4, 8, 12]}
    timing: {examples: 20, seconds_per_run: 8}
    overrides: [train.progress=false]
    tasks:
      gsm8k:
        seeds: [0, 1, 2]
        ood: [gsm-hard, svamp, multiarith]
        methods:
          nocot: ../smollm2/gsm8k_nocot.yaml        # paths relative to the spec file
          rim: {config: ../smollm2/gsm8k_rim.yaml, seeds: [0, 1]}
    smoke: {deadline_s: 110, overrides: [model.name=tiny, ...]}

Unknown keys are errors naming the key; every job's config is built (and so checked) before anything runs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rim.compare import merge
from rim.config import Config, ConfigError, load_config

TOP_KEYS = ("output_dir", "deadline_s", "max_concurrent", "calibration", "timing", "overrides", "tasks", "smoke",
            "eval_cost_factor", "min_steps", "floor", "pack_s", "threads_per_process", "selections")
CALIBRATION_KEYS = ("steps", "levels", "eval_examples", "max_share")
TIMING_KEYS = ("examples", "seconds_per_run")
TASK_KEYS = ("seeds", "ood", "methods")
METHOD_KEYS = ("config", "seeds", "overrides", "icot_remove_by")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a folder and file name the device lets come back


@dataclass
class Calibration:
    """How speed is measured: ``steps`` optimizer steps per process at each concurrency of ``levels``, then
    ``eval_examples`` problems scored (greedy, no per-block readouts) for the time a problem costs."""

    steps: int = 12
    levels: list[int] = field(default_factory=lambda: [1, 4, 8, 12])
    eval_examples: int = 64
    max_share: float = 0.4  # the calibration is stopped at this fraction of deadline_s


@dataclass
class Timing:
    """Batch-1 timing of every final checkpoint alone, after the concurrent phase: ``examples`` problems each;
    ``seconds_per_run`` is reserved per run in the budget (model load + timing)."""

    examples: int = 20
    seconds_per_run: float = 8.0


@dataclass
class MethodEntry:
    """One method of a task: its config file, seeds (default: the task's), extra overrides and, for iCoT-SI,
    ``icot_remove_by``: the fraction of the budget by which every reasoning token is removed (Δ is set from it)."""

    label: str
    config: Path
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    icot_remove_by: float | None = None


@dataclass
class TaskEntry:
    """One task of the campaign: its methods (one step budget shared by all of them) and OOD tasks."""

    name: str
    methods: list[MethodEntry]
    ood: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One training run: task x method x seed, with its config (budget not yet applied) and run folder."""

    label: str  # <task>-<method>-s<seed>
    task: str
    method: str
    seed: int
    config_path: Path
    overrides: list[str]
    ood: list[str]
    icot_remove_by: float | None = None

    def config(self, extra: list[str] | None = None) -> Config:
        """The job's config with ``extra`` overrides (the budget, the output folder) on top."""
        return load_config(self.config_path, [*self.overrides, *(extra or [])])


@dataclass
class CampaignSpec:
    """A parsed spec (after ``--smoke`` if asked): settings and tasks."""

    path: Path
    output_dir: Path
    deadline_s: float
    max_concurrent: int
    calibration: Calibration
    timing: Timing
    overrides: list[str]
    tasks: list[TaskEntry]
    eval_cost_factor: float = 2.0  # safety factor on calibrated scoring time (per-block readouts, longer answers)
    min_steps: int = 1  # a plan with fewer optimizer steps per job than this is refused
    floor: bool = False  # ... unless this is set: then every job gets min_steps and the deadline cuts late ones
    pack_s: float = 15.0  # seconds kept at the end for the report and packing
    threads_per_process: int = 1  # OMP/MKL threads of each worker process
    selections: int = 4  # checkpoint selections on the valid split per run (plus one at each stage end)

    def jobs(self) -> list[Job]:
        """Every task x method x seed, seed-major (every method's first seed first: a cut run still has them)."""
        jobs = [Job(f"{t.name}-{m.label}-s{seed}", t.name, m.label, seed, m.config,
                    [*self.overrides, *m.overrides, f"train.seed={seed}"], t.ood, m.icot_remove_by)
                for t in self.tasks for m in t.methods for seed in m.seeds]
        order = {s: i for i, s in enumerate(sorted({j.seed for j in jobs}))}
        return sorted(jobs, key=lambda j: order[j.seed])  # stable: task and method order kept within a seed


def _expect(value: Any, kind: type | tuple, key: str, where: Path) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: campaign key {key!r}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _known(data: dict, keys: tuple, key: str, where: Path) -> dict:
    _expect(data, dict, key, where)
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown campaign key {(key + '.' if key else '') + unknown[0]!r}; "
                          f"allowed: {list(keys)}")
    return data


def _ints(value: Any, key: str, where: Path) -> list[int]:
    if not isinstance(value, list) or not value or not all(type(v) is int and v >= 0 for v in value) \
            or len(set(value)) < len(value):
        raise ConfigError(f"{where}: campaign key {key!r}: expected a non-empty list of distinct integers >= 0, "
                          f"got {value!r}")
    return value


def _strings(value: Any, key: str, where: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: campaign key {key!r}: expected a list of strings, got {value!r}")
    return value


def _method(label: str, value: Any, task: dict, key: str, where: Path) -> MethodEntry:
    if not isinstance(label, str) or not LABEL.fullmatch(label):
        raise ConfigError(f"{where}: campaign key {key!r}: label {label!r} must be letters, digits, '_', '.', '-'")
    data = {"config": value} if isinstance(value, str) else _known(value, METHOD_KEYS, key, where)
    if "config" not in data:
        raise ConfigError(f"{where}: campaign key {key + '.config'!r} is missing")
    path = (where.parent / _expect(data["config"], str, key + ".config", where)).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: campaign key {key + '.config'!r}: no file {path}")
    remove_by = data.get("icot_remove_by")
    if remove_by is not None and not (isinstance(remove_by, (int, float)) and 0 < remove_by <= 1):
        raise ConfigError(f"{where}: campaign key {key + '.icot_remove_by'!r}: expected a number in (0, 1]")
    return MethodEntry(label, path, _ints(data.get("seeds", task.get("seeds", [0])), key + ".seeds", where),
                       _strings(data.get("overrides", []), key + ".overrides", where), remove_by)


def _tasks(data: Any, where: Path) -> list[TaskEntry]:
    _expect(data, dict, "tasks", where)
    if not data:
        raise ConfigError(f"{where}: campaign key 'tasks': expected at least one task")
    tasks = []
    for name, task in data.items():
        key = f"tasks.{name}"
        _known(task, TASK_KEYS, key, where)
        if not LABEL.fullmatch(str(name)):
            raise ConfigError(f"{where}: campaign key {key!r}: the task label must be letters, digits, '_', '.', '-'")
        methods = _expect(task.get("methods"), dict, key + ".methods", where)
        if not methods:
            raise ConfigError(f"{where}: campaign key {key + '.methods'!r}: expected at least one method")
        _ints(task.get("seeds", [0]), key + ".seeds", where)
        tasks.append(TaskEntry(str(name), [_method(label, value, task, f"{key}.methods.{label}", where)
                                           for label, value in methods.items()],
                               _strings(task.get("ood", []), key + ".ood", where)))
    return tasks


def load_campaign(path: str | Path, smoke: bool = False) -> CampaignSpec:
    """Parse a campaign spec; ``smoke`` merges its ``smoke`` block over the rest (mappings key by key, lists
    replace; ``smoke.overrides`` are appended to ``overrides``). Every job's config is built once to check it."""
    where = Path(path).resolve()
    try:
        data = _known(yaml.safe_load(where.read_text(encoding="utf-8")) or {}, TOP_KEYS, "", where)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    data = copy.deepcopy(data)
    smoke_data = _known(data.pop("smoke", None) or {}, tuple(k for k in TOP_KEYS if k != "smoke"), "smoke", where)
    if smoke:
        extra = smoke_data.pop("overrides", [])
        data = merge(data, smoke_data)
        data["overrides"] = [*_strings(data.get("overrides", []), "overrides", where),
                             *_strings(extra, "smoke.overrides", where)]
    calibration = Calibration(**_known(data.get("calibration") or {}, CALIBRATION_KEYS, "calibration", where))
    timing = Timing(**_known(data.get("timing") or {}, TIMING_KEYS, "timing", where))
    _ints(calibration.levels, "calibration.levels", where)
    if min(calibration.levels) < 1 or calibration.steps < 1 or calibration.eval_examples < 1:
        raise ConfigError(f"{where}: campaign keys 'calibration.*' must be >= 1")
    spec = CampaignSpec(
        path=where, output_dir=Path(_expect(data.get("output_dir", f"runs/campaign/{where.stem}"), str, "output_dir",
                                            where)),
        deadline_s=float(_expect(data.get("deadline_s", 530), (int, float), "deadline_s", where)),
        max_concurrent=_expect(data.get("max_concurrent", max(calibration.levels)), int, "max_concurrent", where),
        calibration=calibration, timing=timing, overrides=_strings(data.get("overrides", []), "overrides", where),
        tasks=_tasks(data.get("tasks"), where),
        eval_cost_factor=float(_expect(data.get("eval_cost_factor", 2.0), (int, float), "eval_cost_factor", where)),
        min_steps=_expect(data.get("min_steps", 1), int, "min_steps", where),
        floor=_expect(data.get("floor", False), bool, "floor", where),
        pack_s=float(_expect(data.get("pack_s", 15.0), (int, float), "pack_s", where)),
        threads_per_process=_expect(data.get("threads_per_process", 1), int, "threads_per_process", where),
        selections=_expect(data.get("selections", 4), int, "selections", where))
    for job in spec.jobs():  # every config checked before anything runs
        try:
            job.config()
        except ConfigError as err:
            raise ConfigError(f"{where}: job {job.label} ({job.config_path.name}): {err}") from None
    return spec
