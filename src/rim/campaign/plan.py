"""From calibration numbers to a plan: how many training processes run at once and how many optimizer steps each
job of a task gets, so that every job (training, selection, scoring, OOD scoring) fits its time slot.

Pure functions over numbers; ``rim.campaign.run`` measures the numbers and applies the plan.

The model: ``n`` jobs run ``c`` at a time, in ``ceil(n / c)`` waves of one slot each; a job of method ``t`` at
concurrency ``c`` costs ``overhead_s(t, c) + steps / steps_per_s(t, c) + problems(t) * eval_s(t, c) *
eval_cost_factor`` seconds (the overhead: a process's start, imports and loading, measured too).
A task's step budget is the largest that its slowest method fits into the slot, so every method of a task gets the
same number of steps. The concurrency chosen is the measured level that gives the most steps in total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Speed:
    """One method's measured (or estimated) speed at one concurrency."""

    steps_per_s: float  # optimizer steps per second of one process
    eval_s: float  # seconds per scored problem of one process (greedy, batched)
    estimated: bool = False  # derived from another level or method, not measured at this level
    overhead_s: float = 0.0  # seconds of a process outside training and scoring (imports, model and data loading)


@dataclass
class Plan:
    """The chosen concurrency and per-task steps, with every level that was considered (for the record)."""

    concurrency: int
    waves: int
    slot_s: float
    steps: dict[str, int]
    levels: list[dict] = field(default_factory=list)
    floored: bool = False  # no level fitted: the steps were raised to the minimum (the deadline cuts what is late)


class PlanError(RuntimeError):
    """No measured concurrency leaves every task its minimum steps before the deadline."""


def mean_speeds(samples: list[dict]) -> dict[str, dict[int, Speed]]:
    """Mean speed per (method, level) from calibration samples ``{method, level, steps, train_s, problems,
    eval_s}`` (one per process; samples without timings, from processes that failed, are left out)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for s in samples:
        if s.get("train_s") and s.get("eval_s") and s.get("problems"):
            groups.setdefault((s["method"], s["level"]), []).append(s)
    out: dict[str, dict[int, Speed]] = {}
    for (method, level), group in groups.items():
        sps = sum(s["steps"] / s["train_s"] for s in group) / len(group)
        eval_s = sum(s["eval_s"] / s["problems"] for s in group) / len(group)
        overhead = sum(max(0.0, (s.get("wall_s") or 0.0) - s["train_s"] - s["eval_s"]) for s in group) / len(group)
        out.setdefault(method, {})[level] = Speed(sps, eval_s, overhead_s=overhead)
    return out


def speed_at(measured: dict[str, dict[int, Speed]], method: str, level: int, reference: str) -> Speed:
    """``method``'s speed at ``level``: measured; else its nearest measured level scaled by how the ``reference``
    method (measured at every level) slowed down between the two; else the slowest method measured at ``level``.

    >>> m = {"a": {1: Speed(10.0, 0.25), 4: Speed(5.0, 0.5)}, "b": {4: Speed(2.0, 1.0)}}
    >>> speed_at(m, "b", 1, "a")
    Speed(steps_per_s=4.0, eval_s=0.5, estimated=True, overhead_s=0.0)
    >>> speed_at(m, "c", 4, "a")
    Speed(steps_per_s=2.0, eval_s=1.0, estimated=True, overhead_s=0.0)
    """
    own = measured.get(method, {})
    if level in own:
        return own[level]
    ref = measured.get(reference, {})
    known = [c for c in own if c in ref]
    if known and level in ref:
        near = min(known, key=lambda c: (abs(math.log(c / level)), c))
        return Speed(own[near].steps_per_s * ref[level].steps_per_s / ref[near].steps_per_s,
                     own[near].eval_s * ref[level].eval_s / ref[near].eval_s, True, ref[level].overhead_s)
    at_level = [s[level] for s in measured.values() if level in s]
    if not at_level:
        raise PlanError(f"no calibration measurement at concurrency {level}")
    slowest = min(at_level, key=lambda s: s.steps_per_s)
    return Speed(slowest.steps_per_s, max(s.eval_s for s in at_level), True, max(s.overhead_s for s in at_level))


def plan_budget(tasks: dict[str, list[str]], problems: dict[str, float], measured: dict[str, dict[int, Speed]],
                levels: list[int], time_s: float, eval_cost_factor: float = 2.0, min_steps: int = 1,
                max_concurrent: int | None = None, floor: bool = False) -> Plan:
    """The plan for ``tasks`` (task -> the method of each of its jobs, one entry per job) given ``time_s`` seconds
    for the concurrent phase; ``problems``: problems each method's job scores (selection, test, OOD).
    When no level fits every task's ``min_steps``: ``PlanError``, or with ``floor`` the level that fits the most
    steps with every task raised to ``min_steps`` (a rehearsal on a busy CPU still runs; its deadline cuts the
    jobs that come late, as it would on the device).

    >>> m = {"nocot": {1: Speed(4.0, 0.01), 2: Speed(3.0, 0.02)}, "cot": {1: Speed(2.0, 0.05), 2: Speed(1.5, 0.1)}}
    >>> p = plan_budget({"t": ["nocot", "cot"]}, {"nocot": 100, "cot": 100}, m, [1, 2], 120.0, 1.0)
    >>> p.concurrency, p.waves, p.slot_s, p.steps
    (2, 1, 120.0, {'t': 165})
    >>> plan_budget({"t": ["nocot", "cot"]}, {"nocot": 100, "cot": 100}, m, [1, 2], 5.0, 1.0, 2, floor=True).steps
    {'t': 2}
    """
    n_jobs = sum(len(methods) for methods in tasks.values())
    reference = next(iter(measured)) if measured else ""
    candidates = [c for c in sorted(set(levels)) if c <= (max_concurrent or c) and c <= max(n_jobs, min(levels))]
    rows, best = [], None
    for c in candidates:
        waves = math.ceil(n_jobs / c)
        slot = time_s / waves
        steps = {}
        for task, methods in tasks.items():
            fits = []
            for method in dict.fromkeys(methods):
                speed = speed_at(measured, method, c, reference)
                scoring = problems[method] * speed.eval_s * eval_cost_factor
                fits.append(math.floor((slot - speed.overhead_s - scoring) * speed.steps_per_s))
            steps[task] = max(0, min(fits))
        feasible = all(s >= min_steps for s in steps.values())
        rows.append({"concurrency": c, "waves": waves, "slot_s": round(slot, 2), "steps": steps, "feasible": feasible})
        if feasible and (best is None or sum(steps.values()) > sum(best.steps.values())):
            best = Plan(c, waves, slot, steps)
    if best is None and floor and rows:
        row = max(rows, key=lambda r: (min(r["steps"].values()), -r["waves"]))
        best = Plan(row["concurrency"], row["waves"], row["slot_s"],
                    {t: max(n, min_steps) for t, n in row["steps"].items()}, floored=True)
    if best is None:
        raise PlanError(f"no concurrency leaves every task {min_steps} steps in {time_s:.0f} s: {rows}")
    best.levels = rows
    return best


def stage_steps(weights: list[float], total: int) -> list[int]:
    """``total`` optimizer steps shared among stages in proportion to ``weights`` (their epochs or steps in the
    config), each stage at least 1, by largest remainder.

    >>> stage_steps([3, 1], 100), stage_steps([5, 5, 5, 5, 5, 5, 20], 50), stage_steps([1, 1], 1)
    ([75, 25], [5, 5, 5, 5, 5, 5, 20], [1, 1])
    """
    total = max(total, len(weights))
    exact = [w * total / sum(weights) for w in weights]
    out = [max(1, math.floor(x)) for x in exact]
    by_fraction = sorted(range(len(weights)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    for i in by_fraction[: max(0, total - sum(out))]:
        out[i] += 1
    while sum(out) > total:  # the floor of 1 took steps from somewhere: give them back from the longest stage
        out[out.index(max(out))] -= 1
    return out
