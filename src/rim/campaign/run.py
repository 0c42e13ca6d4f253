"""``rim campaign SPEC``: calibrate, plan, train every job as concurrent processes, time each final checkpoint
alone, and pack the results into at most 8 files before a hard deadline.

Phases, all inside ``deadline_s`` from the command's start:

1. the model named by the configs is converted once (``rim.models.hub``), so the processes only load it;
2. calibration: for each concurrency of ``calibration.levels``, that many processes train ``calibration.steps``
   steps and score ``calibration.eval_examples`` problems (the methods in turn); their speeds give the plan
   (``rim.campaign.plan``): the concurrency and each task's step budget, the same for every method of a task;
3. the jobs run ``concurrency`` at a time, seed-major; each writes its results as it gets them; at the end of
   the phase the jobs still running are stopped (their finished scorings are kept);
4. every finished run is timed at batch 1 alone on the device (TTFT, latency);
5. the report tables are written and everything is packed into ``--out`` (also after every finished job, so a
   command cut short by an outer limit still leaves the last pack).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rim.campaign.plan import Plan, mean_speeds, plan_budget, stage_steps
from rim.campaign.spec import CampaignSpec, Job, load_campaign
from rim.campaign.worker import write_json
from rim.rundir import CONFIG, METRICS, RESULTS, RunDir

MAX_FILE = 16 * 1024 * 1024 - 4096  # the device returns files under 16 MiB
LOG_TAIL = 256 * 1024  # bytes of each process log that are packed
GRACE_S = 5.0  # between SIGTERM and SIGKILL of a process stopped at the deadline


@dataclass
class Proc:
    """A process to run: its label, argument vector and log file."""

    label: str
    argv: list[str]
    log: Path
    status: str = "waiting"  # waiting, running, done, failed (rc != 0), stopped (deadline), not started
    wall_s: float | None = None
    rc: int | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a worker: this rim on the path, ``threads`` CPU threads, unbuffered output."""
    src = str(Path(__file__).resolve().parents[2])  # the folder that holds the rim package
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def stop(proc: Proc) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period (the train loop stops cleanly on SIGTERM)."""
    if proc.popen is None or proc.popen.poll() is not None:
        return
    try:
        os.killpg(proc.popen.pid, signal.SIGTERM)
        proc.popen.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait()
    except ProcessLookupError:
        pass


def run_processes(procs: list[Proc], concurrency: int, until: float, env: dict[str, str], on_finish=None,
                  poll_s: float = 0.2) -> list[Proc]:
    """Run ``procs`` at most ``concurrency`` at a time, in order, until each ends or the clock (time.monotonic)
    reaches ``until``: then those still running are stopped and those not started are marked so.
    ``on_finish(proc)`` is called as each process ends."""
    waiting, running = list(procs), []
    while waiting or running:
        now = time.monotonic()
        if now >= until:
            for proc in running:
                stop(proc)
                proc.status, proc.wall_s = "stopped", time.monotonic() - proc.started
            for proc in waiting:
                proc.status = "not started"
            break
        while waiting and len(running) < concurrency:
            proc = waiting.pop(0)
            proc.log.parent.mkdir(parents=True, exist_ok=True)
            with open(proc.log, "wb") as log:  # the child holds its own descriptor
                proc.popen = subprocess.Popen(proc.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True)  # its own group: stopped as one
            proc.status, proc.started = "running", time.monotonic()
            running.append(proc)
        for proc in [p for p in running if p.popen.poll() is not None]:
            running.remove(proc)
            proc.rc, proc.wall_s = proc.popen.returncode, time.monotonic() - proc.started
            proc.status = "done" if proc.rc == 0 else "failed"
            if on_finish:
                on_finish(proc)
        time.sleep(poll_s)
    return procs


def worker_proc(label: str, mode: str, job: dict, folder: Path) -> Proc:
    """A worker process for ``job`` (written to ``folder/<label>.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}.json"
    write_json(path, job)
    return Proc(label, [sys.executable, "-m", "rim.campaign.worker", mode, str(path)], folder / f"{label}.log")


def stage_overrides(job: Job, steps: int) -> list[str]:
    """Overrides that give ``steps`` optimizer steps to the job's stages, shared as their epochs (or steps) are."""
    stages = job.config().stages
    shares = stage_steps([s.epochs if s.epochs is not None else s.steps for s in stages], steps)
    return [o for i, n in enumerate(shares) for o in (f"stages.{i}.steps={n}", f"stages.{i}.epochs=null")]


def template_of(job: Job) -> str:
    """The calibration key of a job: its task and method (seeds run at the same speed)."""
    return f"{job.task}/{job.method}"


class Campaign:
    """One campaign command's state; ``record()`` writes it to ``campaign.json`` whenever it changes."""

    def __init__(self, spec: CampaignSpec, out: Path, start: float):
        self.spec, self.out, self.start = spec, out, start
        self.deadline = start + spec.deadline_s
        self.root = spec.output_dir
        self.env = worker_env(spec.threads_per_process)
        self.state: dict = {"spec": str(spec.path), "deadline_s": spec.deadline_s, "phases": {}, "jobs": {},
                            "calibration": [], "plan": None, "environment": environment()}

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 2)

    def phase(self, name: str, **info) -> None:
        """Record that phase ``name`` ended now, with ``info``."""
        self.state["phases"][name] = {"end_s": self.elapsed(), **info}
        print(f"== campaign: {name} done at {self.elapsed():.1f} s {info or ''}", flush=True)
        self.record()

    def record(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / "campaign.json", self.state)

    def prepare_models(self, jobs: list[Job]) -> None:
        """Convert each aliased model once here, so concurrent processes do not all convert it."""
        from rim.models.hub import MODEL_ALIASES, resolve_model_path

        for name in dict.fromkeys(j.config().model.name for j in jobs):
            if name in MODEL_ALIASES:
                resolve_model_path(name)
        self.phase("models")

    def calibrate(self, jobs: list[Job]) -> list[dict]:
        """Calibration rounds at each level: the methods in turn, ``calibration.steps`` steps each."""
        cal = self.spec.calibration
        templates = list(dict.fromkeys(template_of(j) for j in jobs))
        first = {t: next(j for j in jobs if template_of(j) == t) for t in templates}
        until = self.start + self.spec.deadline_s * cal.max_share
        samples = []
        for level in sorted(cal.levels):
            procs = []
            for i in range(level):
                job = first[templates[i % len(templates)]]
                cfg = job.config()
                label = f"c{level}-{i}-{job.task}-{job.method}"
                run_dir = self.root / "calibration" / label
                batch = cfg.train.batch_size * cfg.train.grad_accum
                overrides = [*job.overrides, *stage_overrides(job, cal.steps), "eval.select_split=null",
                             "eval.every=null", "eval.latency_examples=0", "train.save_every=null",
                             f"data.max_train={cal.steps * batch}", f"output_dir={run_dir}", "overwrite=true"]
                procs.append(worker_proc(label, "calibrate", {
                    "config": str(job.config_path), "overrides": overrides, "method": template_of(job),
                    "level": level, "eval_examples": cal.eval_examples,
                    "eval_split": cfg.eval.select_split or cfg.data.train_split},
                    self.root / "calibration"))
            run_processes(procs, level, until, self.env)
            for proc in procs:
                path = self.root / "calibration" / proc.label / "calibration.json"
                sample = json.loads(path.read_text()) if path.is_file() else {"level": level, "error": proc.status}
                samples.append({**sample, "label": proc.label, "status": proc.status, "wall_s": proc.wall_s})
            self.state["calibration"] = samples
            self.record()
        self.phase("calibration", levels=sorted(cal.levels))
        return samples

    def plan(self, jobs: list[Job], samples: list[dict]) -> Plan:
        """The concurrency and steps per task from the calibration, for the time left before the timing phase."""
        tasks: dict[str, list[str]] = {}
        for job in jobs:
            tasks.setdefault(job.task, []).append(template_of(job))
        problems = {template_of(j): scored_problems(j, self.spec.selections) for j in jobs}
        time_s = (self.deadline - time.monotonic() - self.spec.pack_s
                  - self.spec.timing.seconds_per_run * len(jobs))
        # a task's budget covers one step of each stage of its longest curriculum (Coconut's 7): below that every
        # stage still gets a step, and the methods' budgets would differ
        stages = {t: max(len(j.config().stages) for j in jobs if j.task == t) for t in tasks}
        plan = plan_budget(tasks, problems, mean_speeds(samples), self.spec.calibration.levels, time_s,
                           self.spec.eval_cost_factor, max(self.spec.min_steps, *stages.values()),
                           self.spec.max_concurrent, self.spec.floor)
        self.state["plan"] = {**asdict(plan), "time_s": round(time_s, 2), "problems": problems}
        self.phase("plan", concurrency=plan.concurrency, steps=plan.steps)
        return plan

    def job_overrides(self, job: Job, steps: int) -> list[str]:
        """The job's budget: its task's steps over its stages, selection ``selections`` times, no timing while
        other processes share the device, and its run folder."""
        cfg = job.config()
        every = max(1, steps // self.spec.selections)
        out = [*job.overrides, *stage_overrides(job, steps), "eval.latency_examples=0",
               f"output_dir={self.root / 'runs' / job.label}", "overwrite=true"]
        if cfg.eval.select_split:
            out.append(f"eval.every={every}")
        if job.icot_remove_by is not None:
            out.append(f"method.remove_per_epoch={icot_delta(job, steps, job.icot_remove_by):.4f}")
        return out

    def train(self, jobs: list[Job], plan: Plan, out: Path) -> list[Proc]:
        """Every job, ``plan.concurrency`` at a time, until the time kept for timing and packing."""
        procs = []
        for job in jobs:
            overrides = self.job_overrides(job, plan.steps[job.task])
            procs.append(worker_proc(job.label, "train", {"label": job.label, "config": str(job.config_path),
                                                          "overrides": overrides, "ood": job.ood},
                                     self.root / "jobs"))
            self.state["jobs"][job.label] = {"task": job.task, "method": job.method, "seed": job.seed,
                                             "run_dir": f"runs/{job.label}", "overrides": overrides,
                                             "status": "waiting"}
        until = self.deadline - self.spec.pack_s - self.spec.timing.seconds_per_run * len(jobs)

        def finished(proc: Proc) -> None:
            self.state["jobs"][proc.label].update(status=proc.status, wall_s=round(proc.wall_s, 2), rc=proc.rc)
            self.record()
            pack(self.root, out)  # a command cut short still leaves every finished job

        run_processes(procs, plan.concurrency, until, self.env, finished)
        for proc in procs:
            self.state["jobs"][proc.label].update(status=proc.status, rc=proc.rc,
                                                  wall_s=None if proc.wall_s is None else round(proc.wall_s, 2))
        self.phase("train", **{s: sum(p.status == s for p in procs) for s in ("done", "failed", "stopped",
                                                                             "not started")})
        return procs

    def time_runs(self, procs: list[Proc]) -> None:
        """Batch-1 timing of every run that has a scored checkpoint, alone on the device, until the pack margin."""
        runs = [str(self.root / "runs" / p.label) for p in procs if RunDir(self.root / "runs" / p.label).finished()]
        if runs:
            timer = worker_proc("timing", "time", {"runs": runs, "examples": self.spec.timing.examples},
                                self.root / "jobs")
            run_processes([timer], 1, self.deadline - self.spec.pack_s, self.env)
            self.phase("timing", status=timer.status, runs=len(runs))


def scored_problems(job: Job, selections: int) -> int:
    """Problems one job scores: selection (``selections`` times plus once per stage end), test and OOD."""
    from rim.data.tasks import make_task
    from rim.train.selection import selection_problems

    cfg = job.config()
    task = make_task(cfg.data.task, cfg.data.options)
    n = len(task.load(cfg.data.eval_split)[: cfg.data.max_eval])
    options = {k: v for k, v in cfg.data.options.items() if k == "data_dir"}
    n += sum(len(make_task(t, options).load("test")[: cfg.data.max_eval]) for t in job.ood)
    if cfg.eval.select_split:
        n += len(selection_problems(cfg, task)) * (selections + len(cfg.stages))
    return n


def icot_delta(job: Job, steps: int, remove_by: float) -> float:
    """iCoT-SI's Δ (tokens removed per epoch) that removes the longest reasoning of the job's training examples
    by the fraction ``remove_by`` of a budget of ``steps`` optimizer steps."""
    from rim.data.tasks import make_task
    from rim.methods.base import split_cot

    cfg = job.config()
    task = make_task(cfg.data.task, cfg.data.options)
    examples = task.load(cfg.data.train_split)[: cfg.data.max_train]
    from rim.models.load import base_tokenizer

    tokenizer = base_tokenizer(cfg.model, task)
    longest = max(len(split_cot(task, tokenizer, ex)[0]) for ex in examples[:2000])
    epochs = steps * cfg.train.batch_size * cfg.train.grad_accum / len(examples)
    return longest / (remove_by * epochs)


def environment() -> dict:
    """Device, library versions and commit, for the record."""
    import platform

    info = {"python": platform.python_version(), "host_cpus": os.cpu_count()}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except ImportError:
        pass
    try:
        here = Path(__file__).resolve().parent
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                        timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _add(tar: tarfile.TarFile, path: Path, name: str, tail: int | None = None) -> None:
    """Add a file (only its last ``tail`` bytes, if given) under ``name``."""
    if tail is None or path.stat().st_size <= tail:
        tar.add(path, arcname=name)
        return
    import io

    with open(path, "rb") as f:
        f.seek(-tail, os.SEEK_END)
        data = f.read()
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(path.stat().st_mtime)
    tar.addfile(info, io.BytesIO(data))


RESULT_FILES = (CONFIG, METRICS, "campaign-done.json", "timing.json", "calibration.json")


def _archive(out: Path, name: str, files: list[tuple[Path, str]], tail: int | None = None) -> str | None:
    """Write ``out/name`` (tar.gz) from ``(path, name in archive)`` pairs; None if it would pass the size limit."""
    tmp = out / f".{name}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path, arcname in files:
            _add(tar, path, arcname, tail)
    if tmp.stat().st_size > MAX_FILE:
        tmp.unlink()
        return None
    tmp.replace(out / name)
    return name


def pack(root: Path, out: Path) -> list[str]:
    """Pack a campaign folder into ``out`` (at most 8 files, each under 16 MiB, names the device returns):
    ``campaign.json``, ``results.tar.gz`` (configs, logs of metrics, every results.json, timings, calibration),
    ``predictions.tar.gz`` (per-problem predictions, left out if too large), ``logs.tar.gz`` (the end of every
    process log) and, once written, ``report.md`` and ``report.tar.gz``. Safe to call again: files are replaced
    whole."""
    out.mkdir(parents=True, exist_ok=True)
    results, predictions, logs = [], [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or "/checkpoint" in f"/{rel}" or "/best/" in f"/{rel}" or rel.endswith(".tmp"):
            continue  # weights stay on the device (a LoRA of rank 128 is over 100 MB a run)
        if path.name in RESULT_FILES or path.name == RESULTS:
            results.append((path, rel))
        elif path.name == "predictions.jsonl":
            predictions.append((path, rel))
        elif path.suffix == ".log":
            logs.append((path, rel))
    written = []
    if (root / "campaign.json").is_file():
        shutil.copyfile(root / "campaign.json", out / "campaign.json")
        written.append("campaign.json")
    for name, files, tail in (("results.tar.gz", results, None), ("predictions.tar.gz", predictions, None),
                              ("logs.tar.gz", logs, LOG_TAIL)):
        if files and _archive(out, name, files, tail):
            written.append(name)
    report = root / "report"
    if (report / "report.md").is_file():
        shutil.copyfile(report / "report.md", out / "report.md")
        written.append("report.md")
        if _archive(out, "report.tar.gz", [(p, p.relative_to(root).as_posix()) for p in sorted(report.rglob("*"))
                                           if p.is_file()]):
            written.append("report.tar.gz")
    return written


def run_campaign(spec_path: str | Path, out: str | Path, smoke: bool = False) -> dict:
    """The whole command (see the module docstring); returns the campaign state also written to campaign.json."""
    start = time.monotonic()
    spec = load_campaign(spec_path, smoke)
    out = Path(out)
    if spec.output_dir.exists():  # a campaign is one timed run: nothing of an earlier one is mixed in
        shutil.rmtree(spec.output_dir)
    campaign = Campaign(spec, out, start)
    jobs = spec.jobs()
    campaign.state["smoke"] = smoke
    campaign.record()
    try:
        campaign.prepare_models(jobs)
        samples = campaign.calibrate(jobs)
        plan = campaign.plan(jobs, samples)
        procs = campaign.train(jobs, plan, out)
        campaign.time_runs(procs)
        from rim.campaign.report import write_campaign_report

        write_campaign_report(spec.output_dir, spec.output_dir / "report")
        campaign.phase("report")
    except Exception as err:  # whatever failed, what finished is packed
        campaign.state["error"] = f"{type(err).__name__}: {err}"
        campaign.record()
        pack(spec.output_dir, out)
        raise
    campaign.state["packed"] = pack(spec.output_dir, out)
    campaign.phase("pack", files=campaign.state["packed"])
    pack(spec.output_dir, out)  # once more, with the pack phase recorded
    return campaign.state
