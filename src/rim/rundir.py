"""The run directory (docs/run-directory.md): the one place that knows its names and formats.

    run = RunDir("runs/demo/rim")
    run.checkpoint("best")             # runs/demo/rim/best, if it finished (FileNotFoundError otherwise)
    run.latest_valid()                 # the newest intact checkpoints/step-N (for --resume auto), or None
    run.eval_dir("gsm-hard", "checkpoints/step-400")   # runs/demo/rim/eval-gsm-hard-checkpoints_step-400
    run.events()                       # metrics.jsonl, one dict per line

Every command reads and writes runs through ``RunDir``: training (checkpoints, events, resume), ``rim eval``
(results), ``rim compare``, ``rim plot``, ``rim analyze`` and ``rim export``. Checkpoint folders are written
atomically (``write_atomic``: a temporary sibling, a manifest of SHA-256 hashes, flushed, renamed into place). A
leaf apart from ``rim.errors``: it imports nothing else of rim, so every layer may use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from rim.errors import CheckpointError

CONFIG, LAYOUT, METRICS = "config.yaml", "layout.txt", "metrics.jsonl"
PLOTS, ANALYSIS = "plots", "analysis"  # what rim plot and rim analyze write
FINAL, BEST, STEPS = "checkpoint", "best", "checkpoints"  # the final weights, the best on selection, step-N
META, MANIFEST, RESULTS = "rim.json", "manifest.json", "results.json"
STATE_PT, STATE_JSON = "trainer_state.pt", "trainer_state.json"
# the folders that ``write_atomic`` replaces, moving the old one aside to ``<name>.old`` meanwhile
REPLACED = (FINAL, BEST)
# what a run writes (besides config.yaml, layout.txt and eval*/ results) that a rerun must not mix with its own
RUN_OUTPUTS = (FINAL, STEPS, BEST, METRICS, *(f"{name}.old" for name in REPLACED))


def step_name(step: int) -> str:
    """The resumable checkpoint after optimizer step ``step``, relative to the run: ``checkpoints/step-N``."""
    return f"{STEPS}/step-{step}"


def step_of(folder: Path) -> int | None:
    """N of a ``step-N`` folder; None for any other name (``step-N.tmp``, left by an interrupted save, included)."""
    match = re.fullmatch(r"step-(\d+)", folder.name)
    return int(match.group(1)) if match else None


def eval_name(task_name: str | None = None, checkpoint: str = FINAL) -> str:
    """The folder ``rim eval RUN [--task T] [--checkpoint C]`` writes into: ``eval[-<task>][-<checkpoint>]``, with
    the ``/`` of ``checkpoints/step-N`` made ``_`` (one folder, not a tree)."""
    return ("eval" + (f"-{task_name}" if task_name else "")
            + ("" if checkpoint == FINAL else "-" + checkpoint.replace("/", "_")))


def protocol_name(task_name: str | None = None) -> str:
    """The folder ``rim eval RUN --protocol splits [--task T]`` writes into."""
    return "eval-protocol" + (f"-{task_name}" if task_name else "")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder and the folder itself to disk (before it is renamed into place)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(folder: Path) -> None:
    """Hash every file of a checkpoint folder into its manifest."""
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1), encoding="utf-8")


def verify(folder: Path) -> None:
    """Raise CheckpointError unless every file of the manifest is present with its hash."""
    manifest = folder / MANIFEST
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}: no readable {MANIFEST} ({err}); the checkpoint is incomplete") from None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{folder}: {name} does not match its hash (truncated or altered)")


def write_atomic(path: Path, fill: Callable[[Path], None]) -> None:
    """Write a checkpoint folder: ``fill(tmp)`` writes its files into a temporary sibling, which gets a manifest,
    is flushed to disk and renamed over ``path``, so a crash never leaves a half-written checkpoint under the final
    name; an earlier folder there is first moved aside to ``<name>.old`` and deleted last, so one of the two is
    always whole (``RunDir.restore_moved_aside`` finishes a replacement a crash interrupted)."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    write_manifest(tmp)
    fsync_tree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


class RunDir:
    """One run directory: paths by meaning, checkpoints, events (``metrics.jsonl``) and evaluation results."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def layout_path(self) -> Path:
        return self.path / LAYOUT

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS

    @property
    def analysis_dir(self) -> Path:
        return self.path / ANALYSIS

    # --- checkpoints -------------------------------------------------------------------------------------------

    def folder(self, name: str = FINAL) -> Path:
        """The folder of checkpoint ``name`` (``checkpoint``, ``best``, ``checkpoints/step-N``), finished or not."""
        return self.path / name

    def finished(self, name: str = FINAL) -> bool:
        """Whether checkpoint ``name`` was written to the end (it has its ``rim.json``)."""
        return (self.folder(name) / META).is_file()

    def checkpoint(self, name: str = FINAL) -> Path:
        """The folder of a finished checkpoint; FileNotFoundError (saying so) for one that is not there."""
        folder = self.folder(name)
        if not self.finished(name):
            raise FileNotFoundError(f"{folder}: no finished checkpoint (rim.json missing); did `rim train` complete?")
        return folder

    def meta(self, name: str = FINAL) -> dict:
        """A checkpoint's ``rim.json`` (method, M, K, stage, reasoning, ...); CheckpointError if unreadable."""
        path = self.checkpoint(name) / META
        try:
            meta = read_json(path)
        except ValueError as err:
            raise CheckpointError(f"{path}: unreadable ({err})") from err
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: unreadable (not a JSON object)")
        return meta

    def step_folder(self, step: int) -> Path:
        return self.path / step_name(step)

    def step_folders(self) -> list[Path]:
        """Every ``checkpoints/step-N`` folder, finished or not, in step order (not ``step-N.tmp``)."""
        found = [p for p in (self.path / STEPS).glob("step-*") if step_of(p) is not None]
        return sorted(found, key=step_of)

    def resumable(self) -> list[Path]:
        """The ``checkpoints/step-N`` folders that hold a trainer state, newest first."""
        return [p for p in reversed(self.step_folders()) if (p / STATE_JSON).is_file()]

    def latest_valid(self, warn: Callable[[str], object] = print) -> Path | None:
        """The newest resumable checkpoint that passes ``verify``; broken ones are reported and skipped."""
        for folder in self.resumable():
            try:
                verify(folder)
                return folder
            except CheckpointError as err:
                warn(f"rim: skipping a broken checkpoint: {err}")
        return None

    def checkpoints(self) -> list[str]:
        """The finished checkpoints in training order: ``checkpoints/step-N`` by N, then the final ``checkpoint``."""
        steps = [step_name(step_of(p)) for p in self.step_folders() if (p / META).is_file()]
        return steps + ([FINAL] if self.finished(FINAL) else [])

    def prune(self, keep: int) -> None:
        """Keep only the newest ``keep`` resumable checkpoints."""
        for old in self.resumable()[keep:]:
            shutil.rmtree(old)

    def restore_moved_aside(self) -> None:
        """Finish a replacement of ``checkpoint/`` or ``best/`` that a crash interrupted (see ``write_atomic``): a
        ``<name>.old`` without its ``<name>`` is the last whole copy and goes back in place; one beside its
        ``<name>`` is a leftover. Other ``*.old`` folders are not rim's and stay."""
        for name in REPLACED:
            old, target = self.path / f"{name}.old", self.path / name
            if old.is_dir() and not target.exists():
                os.replace(old, target)
            else:
                shutil.rmtree(old, ignore_errors=True)

    def drop_after(self, step: int) -> None:
        """Remove what an abandoned stretch after ``step`` left: later step checkpoints (intact or not) and a
        ``best/`` selected after it, so that pruning, ``--resume auto`` and the paper's protocol only see the
        resumed line."""
        for folder in (self.path / STEPS).glob("step-*"):
            n = step_of(folder.with_name(folder.name.removesuffix(".tmp")))
            if n is not None and n > step:
                shutil.rmtree(folder)
        best = self.path / BEST / META
        if best.is_file() and read_json(best).get("step", 0) > step:
            shutil.rmtree(self.path / BEST)

    # --- what a new run must not mix with -----------------------------------------------------------------------

    def earlier_outputs(self) -> list[Path]:
        """What an earlier run left here: its checkpoints, log and evaluations (``overwrite=true`` removes them)."""
        return [self.path / name for name in RUN_OUTPUTS if (self.path / name).exists()] + sorted(
            self.path.glob("eval*"))

    def finished_work(self) -> list[Path]:
        """Finished work: a final checkpoint, ``best/``, evaluations, or any step checkpoint (also one that fails
        to verify); ``--resume auto`` does not start such a run afresh."""
        return [p for p in self.earlier_outputs() if p.name.removesuffix(".old") in REPLACED
                or p.name.startswith("eval")] + self.step_folders()

    # --- events (metrics.jsonl) ---------------------------------------------------------------------------------

    def append_event(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def events(self, missing_ok: bool = False) -> list[dict]:
        """Every record of ``metrics.jsonl``, in order ([] for a run without one when ``missing_ok``)."""
        if missing_ok and not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def last_event(self, kind: str) -> dict:
        """The last event of this kind (``setup``, ``done``, ...), or {}."""
        return next((e for e in reversed(self.events(missing_ok=True)) if e.get("event") == kind), {})

    def trim_events(self, step: int) -> None:
        """Drop the log lines of steps after ``step`` (an interrupted run's lost tail, which the resumed run redoes)."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by the crash
                continue
            if record.get("step", 0) <= step and record.get("event") != "done":
                keep.append(line)
        tmp = self.metrics_path.with_name(METRICS + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def train_stats(self) -> tuple[int | None, float | None]:
        """Optimizer steps and training wall time (s). The ``done`` event has both; runs older than ``train_s``
        get the sum over stages of each stage's last ``elapsed_s``."""
        events = self.events()
        done = next((e for e in reversed(events) if e.get("event") == "done"), {})
        stage_end = {e["stage"]: e for e in events if e.get("event") == "train"}  # the last line of each stage
        steps = done.get("steps", max((e["step"] for e in stage_end.values()), default=None))
        train_s = done.get("train_s", sum(e["elapsed_s"] for e in stage_end.values()) if stage_end else None)
        return steps, train_s

    # --- evaluation results -------------------------------------------------------------------------------------

    def eval_dir(self, task_name: str | None = None, checkpoint: str = FINAL) -> Path:
        return self.path / eval_name(task_name, checkpoint)

    def results_path(self, out_name: str) -> Path:
        return self.path / out_name / RESULTS

    def read_results(self, out_name: str) -> dict | None:
        """An evaluation's ``results.json`` (``out_name``: its folder), or None where there is none."""
        path = self.results_path(out_name)
        return read_json(path) if path.is_file() else None

    def write_results(self, out_name: str, results: dict) -> Path:
        """Write an evaluation's ``results.json``; returns its folder."""
        path = self.results_path(out_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2), encoding="utf-8")
        return path.parent

    def all_results(self) -> list[tuple[str, dict]]:
        """(folder name, results) of every ``eval*/results.json``, by folder name."""
        return [(path.parent.name, read_json(path)) for path in sorted(self.path.glob(f"eval*/{RESULTS}"))]
