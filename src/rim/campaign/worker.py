"""The processes a campaign starts, one per job (``python -m rim.campaign.worker MODE JOB.json``):

- ``train``: train a run and score it on its test split and OOD tasks (``rim.compare.prepare_run``, the same path
  as ``rim compare``); each ``results.json`` is written as soon as it is scored, then ``campaign-done.json``;
- ``calibrate``: a short training of fixed steps, then a timed scoring pass; writes ``calibration.json``;
- ``time``: batch-1 time to first answer token and latency of finished runs, one after another, alone on the
  device; writes ``timing.json`` into each run as soon as it is timed.

The job file is JSON written by ``rim.campaign.run``; a worker reads nothing else from its parent.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rim.config import inference_blocks, load_config
from rim.rundir import RunDir


def write_json(path: Path, data: dict) -> None:
    """Write JSON under a temporary name and move it into place: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)


def train_job(job: dict) -> None:
    """Train and score one campaign job through ``rim compare``'s machinery."""
    from rim.compare import prepare_run

    cfg = load_config(job["config"], job["overrides"])
    start = time.perf_counter()
    prepare_run(cfg, job["ood"])
    write_json(Path(cfg.output_dir) / "campaign-done.json", {"label": job["label"], "wall_s": time.perf_counter()
                                                             - start})


def calibrate_job(job: dict) -> None:
    """Train ``job``'s fixed steps, then score ``eval_examples`` problems without per-block readouts; the sample
    (steps, training seconds, problems, scoring seconds) goes to ``calibration.json`` in the run folder."""
    from rim.eval.run import eval_run
    from rim.train.loop import train

    cfg = load_config(job["config"], job["overrides"])
    run_dir = train(cfg)
    steps, train_s = RunDir(run_dir).train_stats()
    split = cfg.eval.select_split or job["eval_split"]
    start = time.perf_counter()
    result = eval_run(run_dir, split=split, max_eval=job["eval_examples"], full=False, out_name="eval-calibration")
    write_json(Path(run_dir) / "calibration.json",
               {"method": job["method"], "level": job["level"], "steps": steps, "train_s": train_s,
                "problems": result.metrics["n"], "eval_s": time.perf_counter() - start, "split": split})


def time_run(run_dir: Path, examples: int) -> dict:
    """Median TTFT and latency at batch 1 over the first ``examples`` problems of the run's scored split, with the
    checkpoint it is scored with and the scoring's answer budget (``rim.eval.evaluate.measure_latency``)."""
    from rim.compare import checkpoint_of
    from rim.eval.evaluate import answer_budget, measure_latency, training_reasoning
    from rim.eval.run import load_run

    checkpoint = checkpoint_of(load_config(RunDir(run_dir).config_path))
    cfg, model, tokenizer, method, task = load_run(run_dir, checkpoint=checkpoint)
    blocks = inference_blocks(cfg)
    problems = task.load(cfg.data.eval_split)[:examples]
    prompts = [method.prompt(method.tokenize(task, tokenizer, ex, cfg.data.prompt_format), blocks) for ex in problems]
    budget = answer_budget(task, method, training_reasoning(cfg, task, method, tokenizer))
    times = measure_latency(model, tokenizer, method, prompts, budget)
    return {**times, "examples": len(prompts), "checkpoint": checkpoint, "blocks": blocks,
            "device": str(next(model.parameters()).device)}


def time_job(job: dict) -> None:
    """Time every run of the job, one after another; a run that fails to load is recorded and skipped."""
    for run in job["runs"]:
        run_dir = Path(run)
        try:
            write_json(run_dir / "timing.json", time_run(run_dir, job["examples"]))
        except Exception as err:  # noqa: BLE001 - one broken run must not cost the timing of the others
            write_json(run_dir / "timing.json", {"error": f"{type(err).__name__}: {err}"})
        print(f"timed {run_dir.name}", flush=True)


MODES = {"train": train_job, "calibrate": calibrate_job, "time": time_job}


def main(argv: list[str] | None = None) -> int:
    """``MODE JOB.json``: run one campaign process."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in MODES:
        print(f"usage: python -m rim.campaign.worker {{{','.join(MODES)}}} JOB.json", file=sys.stderr)
        return 2
    MODES[argv[0]](json.loads(Path(argv[1]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
