"""``rim compare``: several methods on one model, data, seed and step budget, in one command and one table.

    rim compare my-compare.yaml [key=value ...] [--retrain]
    rim compare --collect runs/demo/nocot runs/demo/rim --out runs/demo

A compare spec is YAML with ``base`` (config keys shared by every method), ``methods`` (row label -> config keys
merged over ``base``: mappings merge key by key, lists such as ``stages`` replace), ``seeds``, ``ood`` (task
names also scored out of distribution) and ``output_dir``. Each method x seed trains into
``<output_dir>/<label>-s<seed>``; a finished run with the same config is reused, so a rerun only adds what is
missing. The report (``compare.md``, ``.csv``, ``.json``, ``.png``) gives the mean over seeds and, with several
seeds, the standard error of that mean.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import re
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rim.config import Config, flatten, inference_blocks, load_config, to_dict
from rim.data.tasks import check_task_options
from rim.errors import ConfigError
from rim.rundir import BEST, FINAL, RunDir, eval_name

SPEC_KEYS = ("base", "methods", "seeds", "ood", "output_dir")
RESERVED = ("train.seed", "output_dir", "overwrite")  # set by the compare: its seeds, its run dirs, --retrain
UNCOMPARED = ("output_dir", "overwrite", "train.progress", "train.log_every")  # no effect on a run's numbers
EVAL_KEYS = ("final_block_accuracy", "any_block_accuracy", "generated_tokens", "ttft_ms", "latency_ms")
SHARED_KEYS = ("method", "model", "task", "split", "n", "device", "checkpoint", "steps", "batch_size", "grad_accum")


@dataclass
class CompareSpec:
    """A parsed compare spec: each method's config data (``base`` merged in), seeds, OOD tasks, output folder."""

    methods: dict[str, dict]
    seeds: list[int]
    ood: list[str]
    output_dir: Path


def demo_spec_path() -> Path:
    """The packaged spec comparing No-CoT, CoT and RiM on the demo task (the default of ``rim compare``)."""
    return Path(str(resources.files("rim") / "configs" / "compare-demo.yaml"))


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else copy.deepcopy(value)
    return out


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"compare spec key {key!r}: expected a mapping, got {type(value).__name__}")
    return value


def load_spec(path: str | Path) -> CompareSpec:
    """Read a compare spec; unknown keys and malformed entries are errors naming the key."""
    with open(path, encoding="utf-8") as f:
        try:
            data = _mapping(yaml.safe_load(f), "<root>")
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"unknown compare spec key {unknown[0]!r}; a spec has {list(SPEC_KEYS)}")
    base, methods = _mapping(data.get("base"), "base"), _mapping(data.get("methods"), "methods")
    if not methods:
        raise ConfigError("compare spec key 'methods': expected at least one method")
    for label in methods:
        if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", label):
            raise ConfigError(f"compare spec key 'methods': label {label!r} must be a folder name ([A-Za-z0-9_.+-])")
    seeds, ood = data.get("seeds", [0]), data.get("ood", [])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise ConfigError(f"compare spec key 'seeds': expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) < len(seeds):  # one run counted twice would shrink the standard error
        raise ConfigError(f"compare spec key 'seeds': {seeds!r} repeats a seed")
    if not isinstance(ood, list) or not all(isinstance(t, str) for t in ood):
        raise ConfigError(f"compare spec key 'ood': expected a list of task names, got {ood!r}")
    output_dir = data.get("output_dir", f"runs/compare/{Path(path).stem}")
    if not isinstance(output_dir, str):
        raise ConfigError(f"compare spec key 'output_dir': expected str, got {output_dir!r}")
    return CompareSpec({label: merge(base, _mapping(over, f"methods.{label}")) for label, over in methods.items()},
                       seeds, ood, Path(output_dir))


def build_config(data: dict, overrides: list[str]) -> Config:
    """A config from plain data, through ``load_config`` (the same strict checks as ``rim train``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return load_config(path, overrides)


def run_folder(label: str, seed: int) -> str:
    """A compare run's folder name inside the spec's ``output_dir``."""
    return f"{label}-s{seed}"


def method_configs(spec: CompareSpec, overrides: list[str] | None = None,
                   folder: Callable[[str, int], str] = run_folder) -> dict[str, list[Config]]:
    """Every method's config per seed (``train.seed`` and ``output_dir``: ``<output_dir>/<folder(label, seed)>``
    set), all checked before any training."""
    overrides = overrides or []
    configs = {}
    for label, data in spec.methods.items():
        reserved = sorted((set(flatten(data)) | {o.split("=", 1)[0].strip() for o in overrides}) & set(RESERVED))
        if reserved:
            raise ConfigError(f"compare method {label!r}: config key {reserved[0]!r} is set by the compare "
                              "(spec keys seeds and output_dir, flag --retrain)")
        try:
            configs[label] = [build_config(data, [*overrides, f"train.seed={seed}",
                                                  f"output_dir={spec.output_dir / folder(label, seed)}"])
                              for seed in spec.seeds]
            for cfg in configs[label]:  # the task's options too, before any run trains
                cfg.data.options = check_task_options(cfg.data.task, cfg.data.options)
        except ConfigError as err:
            raise ConfigError(f"compare method {label!r}: {err}") from None
    return configs


def checkpoint_of(cfg: Config) -> str:
    """The checkpoint a run is scored with: ``best`` when it selects on a split, else the final one."""
    return BEST if cfg.eval.select_split else FINAL


def config_changes(run_dir: Path, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, value there, value here) for every config key whose value differs from the run's ``config.yaml``,
    leaving out those that do not change a run's numbers."""
    old, new = flatten(to_dict(load_config(RunDir(run_dir).config_path))), flatten(to_dict(cfg))
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and k not in UNCOMPARED]


def check_unchanged(run_dir: Path, cfg: Config) -> None:
    """A finished run is reused only if it was trained with this config; otherwise its numbers would be stale."""
    changed = config_changes(run_dir, cfg)
    if changed:
        key, there, here = changed[0]
        raise ConfigError(f"{run_dir} holds a run with another config (config key {key!r}: {there!r} there, "
                          f"{here!r} here); pass --retrain or choose another output_dir")


def prepare_run(cfg: Config, ood: list[str], retrain: bool = False, advise: bool = True) -> None:
    """Train the run unless it is finished (or ``retrain``), then score what is not scored yet. ``advise``: a
    run that stops says what to do within the compare (``rim demo`` says it its own way)."""
    from rim.errors import NonFiniteLoss, TrainingStopped
    from rim.eval.run import eval_run
    from rim.train.loop import train

    run = RunDir(cfg.output_dir)
    run_dir = run.path
    if run.finished(FINAL) and not retrain:
        check_unchanged(run_dir, cfg)
    else:  # no finished run there, or --retrain
        # an unfinished run of this config continues from its last step checkpoint; anything else starts afresh
        resume = ("auto" if not retrain and run.config_path.is_file() and run.latest_valid() is not None
                  and not config_changes(run_dir, cfg) else None)
        print(f"== {run_dir.name}: {'continuing' if resume else 'training'} ==", flush=True)
        try:
            train(dataclasses.replace(cfg, overwrite=True), resume=resume)
        except TrainingStopped as err:  # the advice is for this run inside the compare
            if not advise:
                raise
            what = ("change the spec (e.g. a lower learning rate) and run `rim compare` again, which trains it "
                    "again from the start" if isinstance(err, NonFiniteLoss) else "run `rim compare` again: it "
                    "continues the run from its last step checkpoint (train.save_every), or starts it again")
            err.args = (f"compare run {run_dir}: {str(err).split('; ')[0]}; {what}",)
            raise
    checkpoint = checkpoint_of(cfg)
    for task_name in [None, *ood]:
        out_name = eval_name(task_name, checkpoint)
        results = run.read_results(out_name)
        why = "not scored yet" if results is None else not_standard(results, cfg, checkpoint)
        if why:  # e.g. `rim eval RUN --split valid` wrote there since: scored again with the run's settings
            print(f"== {run_dir.name}: scoring {task_name or cfg.data.task} ({why}) ==", flush=True)
            eval_run(run_dir, checkpoint=checkpoint, task_name=task_name, out_name=out_name)


def not_standard(results: dict, cfg: Config, checkpoint: str) -> str | None:
    """Why an evaluation is not the run's own (its eval split, K, problem limit and checkpoint), or None. ``rim
    eval RUN --split/--blocks/--max-eval`` writes into the same folder, so a compare checks before it uses one."""
    want = {"split": cfg.data.eval_split, "eval_blocks": inference_blocks(cfg),
            "max_eval": cfg.data.max_eval, "checkpoint": checkpoint}
    for key, value in want.items():
        if key not in results:
            return f"its results.json predates the {key!r} field"
        if results[key] != value:
            return f"it was scored with {key} {results[key]!r}, the run's is {value!r}"
    return None


def read_results(run_dir: Path, out_name: str) -> dict:
    """An evaluation's ``results.json``; the error says which ``rim eval`` writes it."""
    results = RunDir(run_dir).read_results(out_name)
    if results is None:
        raise FileNotFoundError(f"{RunDir(run_dir).results_path(out_name)}: not scored yet; `rim eval {run_dir}` "
                                "(with --checkpoint best when the run selects on a split, --task T for an OOD task) "
                                "writes it")
    return results


def scored_ood(run_dir: Path, cfg: Config, checkpoint: str) -> dict[str, dict]:
    """The results of tasks other than the trained one that this checkpoint of the run has been scored on with the
    run's own settings (for ``--collect``), by task."""
    scored = {}
    for name, results in RunDir(run_dir).all_results():
        task_name = results.get("task")
        if (task_name and task_name != cfg.data.task and name == eval_name(task_name, checkpoint)
                and not_standard(results, cfg, checkpoint) is None):  # not one with other --max-eval, --blocks..
            scored[task_name] = results
    return scored


def model_label(cfg: Config) -> str:
    """The model in a few words: the tiny model's shape, or a hub id / path and what of it trains."""
    m = cfg.model
    if m.name == "tiny":
        return f"tiny {m.tiny_family} ({m.tiny_layers} layers, d = {m.tiny_hidden}, from scratch)"
    return f"{m.name} ({m.train_mode})"


def read_run(run_dir: str | Path, ood: list[str] | None = None) -> dict:
    """One scored run as a flat record: eval metrics, OOD accuracies, training time, steps and batch.

    ``ood=None`` takes every OOD task already scored in the run.
    """
    run_dir = Path(run_dir)
    cfg = load_config(RunDir(run_dir).config_path)
    checkpoint = checkpoint_of(cfg)
    results = read_results(run_dir, eval_name(None, checkpoint))
    steps, train_s = RunDir(run_dir).train_stats()
    others = (scored_ood(run_dir, cfg, checkpoint) if ood is None
              else {t: read_results(run_dir, eval_name(t, checkpoint)) for t in ood})
    for task_name, scored in [(None, results), *others.items()]:
        why = not_standard(scored, cfg, checkpoint)
        if why:
            raise ConfigError(f"{run_dir / eval_name(task_name, checkpoint)}: {why}; `rim compare SPEC` scores it "
                              "again with the run's settings")
    return {"run_dir": str(run_dir), "seed": cfg.train.seed, "method": cfg.method.name, "model": model_label(cfg),
            "task": results["task"], "split": results["split"], "n": results["n"], "device": results["device"],
            "checkpoint": checkpoint, **{key: results[key] for key in EVAL_KEYS},
            **{f"ood_{t}_accuracy": scored["final_block_accuracy"] for t, scored in others.items()},
            "train_s": train_s, "steps": steps, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum}


def mean_se(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean over seeds and, with more than one, the standard error of the mean (sample std / sqrt(n))."""
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return (present[0] if present else None), None
    return statistics.fmean(present), statistics.stdev(present) / math.sqrt(len(present))


def aggregate(label: str, runs: list[dict]) -> dict:
    """One table row from a method's runs (one per seed): mean and standard error of every metric, the budget."""
    row = {"label": label, **{key: runs[0][key] for key in SHARED_KEYS}, "seeds": [r["seed"] for r in runs]}
    metrics = [*EVAL_KEYS[:2], *(k for k in runs[0] if k.startswith("ood_")), *EVAL_KEYS[2:], "train_s"]
    for key in metrics:
        row[key], row[f"{key}_se"] = mean_se([r.get(key) for r in runs])
    row["budget_examples"] = row["steps"] * row["batch_size"] * row["grad_accum"]
    return row


def ood_tasks(rows: list[dict]) -> list[str]:
    """The OOD task names of the rows, in order of first appearance."""
    keys = dict.fromkeys(k for row in rows for k in row if k.startswith("ood_") and not k.endswith("_se"))
    return [k[len("ood_"):-len("_accuracy")] for k in keys]


def _cell(row: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    """``mean`` or ``mean ± SE`` of a row's metric; ``-`` where the method has none."""
    mean, se = row.get(key), row.get(f"{key}_se")
    if mean is None:
        return "-"
    return f"{scale * mean:.{digits}f}" + ("" if se is None else f" ± {scale * se:.{digits}f}")


def format_table(rows: list[dict]) -> str:
    """The Markdown table: accuracies in %, tokens, times, and each method's steps x batch."""
    tasks = ood_tasks(rows)
    head = ["method", "final-block acc. %", "any-block acc. %", *(f"{t} acc. %" for t in tasks), "generated tokens",
            "TTFT ms", "latency ms", "train s", "steps x batch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], _cell(r, "final_block_accuracy", 100), _cell(r, "any_block_accuracy", 100),
                 *(_cell(r, f"ood_{t}_accuracy", 100) for t in tasks), _cell(r, "generated_tokens"),
                 _cell(r, "ttft_ms", digits=2), _cell(r, "latency_ms", digits=2), _cell(r, "train_s"),
                 f"{r['steps']} x {r['batch_size'] * r['grad_accum']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _values(rows: list[dict], key: str) -> str:
    return " / ".join(dict.fromkeys(str(r[key]) for r in rows))


def caption(rows: list[dict]) -> str:
    """One line under the table: model, task, seeds, split, n, device, and each method's budget."""
    seeds = ", ".join(dict.fromkeys(str(s) for r in rows for s in r["seeds"]))
    spread = "mean ± SE over seeds" if any(len(r["seeds"]) > 1 for r in rows) else "one run per method"
    budgets = {r["label"]: f"{r['steps']} x {r['batch_size'] * r['grad_accum']}" for r in rows}
    if len(set(budgets.values())) == 1:
        budget = f"budget {next(iter(budgets.values()))} (optimizer steps x batch) for every method"
    else:
        budget = "budgets DIFFER (optimizer steps x batch): " + ", ".join(f"{k} {v}" for k, v in budgets.items())
    return (f"Model {_values(rows, 'model')}; task {_values(rows, 'task')}, {_values(rows, 'split')} split, "
            f"n = {_values(rows, 'n')}; seeds {seeds} ({spread}); device {_values(rows, 'device')}; {budget}. "
            "TTFT: median time to the first answer token at batch 1; any-block is an oracle.")


def _scaled(se: float | None) -> float | None:
    return None if se is None else 100 * se


def plot(rows: list[dict], path: Path) -> None:
    """Final-block accuracy against TTFT (log x), one labelled point per method; any-block as a hollow marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(row for row in rows if row["ttft_ms"]):  # a log axis has no place for TTFT 0 / None
        color, x, xerr = f"C{i}", r["ttft_ms"], r["ttft_ms_se"]
        ax.errorbar(x, 100 * r["final_block_accuracy"], yerr=_scaled(r["final_block_accuracy_se"]), xerr=xerr,
                    fmt="o", color=color, capsize=3)
        ax.annotate(r["label"], (x, 100 * r["final_block_accuracy"]), textcoords="offset points", xytext=(6, 6))
        if r["any_block_accuracy"] is not None:
            ax.errorbar(x, 100 * r["any_block_accuracy"], yerr=_scaled(r["any_block_accuracy_se"]), fmt="o",
                        color=color, markerfacecolor="none", capsize=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(LogFormatter())  # 5, 10, 20 rather than 5x10^0
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=[Line2D([], [], marker="o", linestyle="", color="gray", label="final block"),
                       Line2D([], [], marker="o", linestyle="", color="gray", markerfacecolor="none",
                              label="any block (oracle)")], loc="best")
    ax.set_title(f"{_values(rows, 'task')}: accuracy vs time to first answer token", fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def write_report(runs: dict[str, list[dict]], out_dir: str | Path) -> list[dict]:
    """Rows from each label's runs; writes ``compare.{md,csv,json,png}`` into ``out_dir``, prints the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [aggregate(label, label_runs) for label, label_runs in runs.items()]
    table, note = format_table(rows), caption(rows)
    (out_dir / "compare.md").write_text(f"{table}\n\n{note}\n", encoding="utf-8")
    (out_dir / "compare.json").write_text(json.dumps({"caption": note, "rows": rows, "runs": runs}, indent=2),
                                          encoding="utf-8")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "compare.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows({**row, "seeds": " ".join(map(str, row["seeds"]))} for row in rows)
    plot(rows, out_dir / "compare.png")
    print(f"\n{table}\n\n{note}\n\nreport: {out_dir / 'compare.md'} (.csv, .json, .png)", flush=True)
    return rows


def run_compare(spec_path: str | Path, overrides: list[str] | None = None, retrain: bool = False) -> list[dict]:
    """Train and score every method x seed of a spec that is not done yet, then write the report; returns rows."""
    spec = load_spec(spec_path)
    configs = method_configs(spec, overrides)
    for cfgs in configs.values():
        for cfg in cfgs:
            prepare_run(cfg, spec.ood, retrain)
    runs = {label: [read_run(cfg.output_dir, spec.ood) for cfg in cfgs] for label, cfgs in configs.items()}
    return write_report(runs, spec.output_dir)


def collect_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[dict]:
    """The report from run directories that are already scored; each is one row, labelled by its folder name."""
    labels = [Path(d).name for d in run_dirs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ConfigError(f"--collect: two run directories named {twice[0]!r}; the folder name labels the row")
    return write_report({label: [read_run(d)] for label, d in zip(labels, run_dirs)}, out_dir)
