"""``rim plot RUN``: PNG plots of a finished run, written into ``RUN/plots/``.

- ``loss.png``: training loss per stage against the global optimizer step (``metrics.jsonl``), stages shaded and
  labelled; a grounding stage's λ schedule on a second axis: the curves λ_1..λ_T for T = the median number of
  reasoning steps of the training examples (each sample anneals relative to its own T), or one line at 1 for the
  ``constant`` schedule.
- ``accuracy_vs_k.png`` (+ ``.json``), methods with memory blocks only: final-block and any-block accuracy against
  K at inference, K = 0..16. The readout after block k is exactly inference with K = k (the prompt is the question
  and k blocks whatever K is), so one evaluation at K = 16 with per-block readouts gives every K >= 1; K = 0, the
  bare question, is one more decode.
- ``block_accuracy.png``, methods with memory blocks only: accuracy of each block's readout at the trained K, from
  the run's ``eval*/results.json`` when it has ``block_accuracy``, else from the K = 0..16 evaluation.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rim.config import METHOD_FACTS, Config, StageConfig, inference_blocks, load_config
from rim.core.curriculum import step_weight
from rim.data.tasks import make_task
from rim.rundir import RunDir, eval_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_BLOCKS = 16


def stage_spans(events: list[dict]) -> list[tuple[str, int, int]]:
    """(stage name, first global step before it, last global step) per stage, in training order, from the train
    events (each stage logs its last step, so its end is known even when ``log_every`` exceeds its length)."""
    spans: dict[str, list[int]] = {}
    for e in events:
        if e.get("event") == "train":
            start = e["step"] - e["stage_step"]
            lo, hi = spans.get(e["stage"], [start, e["step"]])
            spans[e["stage"]] = [min(lo, start), max(hi, e["step"])]
    return [(name, lo, hi) for name, (lo, hi) in spans.items()]


def median_steps(cfg: Config) -> int:
    """T for the λ curves: the median number of reasoning steps of the run's training examples (at least 1)."""
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    examples = task.load(cfg.data.train_split)[: cfg.data.max_train]
    return max(1, statistics.median_low(len(ex.steps) for ex in examples))


def lambda_curves(stage: StageConfig, n_steps: int, total: int) -> torch.Tensor:
    """λ_t for t = 1..T (rows) at each optimizer step 1..total of the stage (columns), as training applies them:
    optimizer step s + 1 uses stage progress s / total."""
    t = torch.arange(1, n_steps + 1)
    columns = [step_weight(t, torch.tensor(n_steps), s / total, stage.step_weight, stage.anneal_end)
               for s in range(total)]
    return torch.stack(columns, dim=1)


def figure(width: float = 6.4, height: float = 4.4, **kwargs) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot, no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def draw_lambda(ax: Axes, stage: StageConfig, n_steps: int, lo: int, hi: int) -> None:
    """λ_1..λ_T of a grounding stage over its global steps lo+1..hi, each curve labelled with its t where it
    crosses 1/2 (a constant schedule is one line at 1)."""
    curves = lambda_curves(stage, n_steps, hi - lo).tolist()
    label = (f"λ_t, t = 1..{n_steps} (T = {n_steps}, the median)" if stage.step_weight == "linear"
             else "λ_t = 1 (constant)")
    for t, row in enumerate(curves, start=1):
        ax.plot(range(lo + 1, hi + 1), row, color="gray", linestyle="--", linewidth=1, label=label if t == 1 else None)
        half = next((i for i, v in enumerate(row) if v <= 0.5), None)
        if half is not None:
            ax.text(lo + 1 + half, 0.5, f" t={t}", color="gray", fontsize=7, va="center")


def plot_loss(run_dir: str | Path, cfg: Config, path: Path) -> None:
    """Training loss per stage against the global step, stages shaded; λ of grounding stages on a twin axis."""
    events = [e for e in RunDir(run_dir).events() if e.get("event") == "train"]
    if not events:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl: no train events; has `rim train` logged a step?")
    stages = {s.name: s for s in cfg.stages}
    fig = figure(7.2, 4.4)
    ax = fig.subplots()
    lam_ax = None
    for i, (name, lo, hi) in enumerate(stage_spans(events)):
        stage = stages.get(name)
        ax.axvspan(lo, hi, color=f"C{i}", alpha=0.08, linewidth=0)
        ax.text((lo + hi) / 2, 0.02, name, transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
        ax.plot(*zip(*[(e["step"], e["loss"]) for e in events if e["stage"] == name]), marker=".", color=f"C{i}",
                label=name if stage is None or stage.kind == name else f"{name} ({stage.kind})")
        if stage is not None and stage.kind == "grounding":
            lam_ax = lam_ax or ax.twinx()
            draw_lambda(lam_ax, stage, median_steps(cfg) if stage.step_weight == "linear" else 1, lo, hi)
    losses = [e["loss"] for e in events]
    if min(losses) > 0 and max(losses) > 10 * min(losses):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step (global)")
    ax.set_ylabel("training loss (weighted readout NLL)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lam_ax is not None:
        lam_ax.set_ylim(-0.05, 1.05)
        lam_ax.set_ylabel("λ_t, weight of step t's readout (grounding)")
        more = lam_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    (lam_ax or ax).legend(handles, labels, loc="upper right", fontsize=8)  # on the top axis, above the λ curves
    ax.set_title(f"{cfg.method.name} on {cfg.data.task}: training loss", fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def accuracy_vs_k(run_dir: str | Path, split: str | None = None, max_eval: int | None = None,
                  checkpoint: str = "checkpoint", device: str = "auto", max_blocks: int = MAX_BLOCKS) -> dict:
    """Final-block and any-block accuracy for K = 0..max_blocks (at least to the trained K), and each block's
    readout accuracy.

    Final-block accuracy at K = k is the accuracy of the readout after block k; any-block accuracy at K = k is the
    share of problems with a right readout among blocks 1..k (at K = 0 the bare question's answer, the only one).
    """
    from rim.eval.evaluate import evaluate, training_reasoning
    from rim.eval.run import load_run

    cfg, model, tokenizer, method, task = load_run(run_dir, device, checkpoint)
    split, trained = split or cfg.data.eval_split, inference_blocks(cfg)
    max_blocks = max(max_blocks, trained)
    examples = [method.tokenize(task, tokenizer, ex, cfg.data.prompt_format)
                for ex in task.load(split)[: max_eval or cfg.data.max_eval]]
    reasoning = training_reasoning(cfg, task, method, tokenizer)
    bare = evaluate(model, tokenizer, task, method, examples, 0, cfg.eval.batch_size, False, 0, reasoning)
    blocks = evaluate(model, tokenizer, task, method, examples, max_blocks, cfg.eval.batch_size, True, 0, reasoning)
    n = len(examples)
    correct = [[b["correct"], *r["block_correct"]] for b, r in zip(bare.records, blocks.records)]
    final = [sum(c[k] for c in correct) / n for k in range(max_blocks + 1)]
    any_block = [final[0]] + [sum(any(c[1:k + 1]) for c in correct) / n for k in range(1, max_blocks + 1)]
    return {"run": str(run_dir), "checkpoint": checkpoint, "task": task.name, "split": split, "n": n,
            "trained_blocks": trained, "K": list(range(max_blocks + 1)),
            "final_block_accuracy": final, "any_block_accuracy": any_block,
            "block_accuracy": blocks.metrics["block_accuracy"]}


def plot_accuracy_vs_k(result: dict, path: Path) -> None:
    """Final-block and any-block accuracy (%) against K at inference, the trained K marked."""
    fig = figure()
    ax = fig.subplots()
    ax.plot(result["K"], [100 * a for a in result["final_block_accuracy"]], marker="o", label="final block")
    ax.plot(result["K"], [100 * a for a in result["any_block_accuracy"]], marker="o", markerfacecolor="none",
            linestyle="--", label="any block (oracle)")
    ax.axvline(result["trained_blocks"], color="gray", linestyle=":", label=f"trained K = {result['trained_blocks']}")
    ax.set_xticks(result["K"])
    ax.set_xlabel("K, memory blocks at inference (0: the bare question)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{result['task']} {result['split']} (n = {result['n']}, {result['checkpoint']}): accuracy vs K",
                 fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def block_accuracy_source(run_dir: str | Path, checkpoint: str, computed: dict) -> dict:
    """Each block's readout accuracy at the trained K: from the checkpoint's ``rim eval`` results when they have
    it at that K and split, else the first K entries of the K = 0..16 evaluation (a block's readout does not
    depend on K)."""
    name = eval_name(None, checkpoint)
    results = RunDir(run_dir).read_results(name)
    if results is not None:
        # only an evaluation at the trained K on this split (rim eval --blocks/--split write into the same folder;
        # its n is shown)
        if (results.get("block_accuracy") and len(results["block_accuracy"]) == computed["trained_blocks"]
                and results["split"] == computed["split"]):
            return {"source": f"{name}/results.json", "split": results["split"], "n": results["n"],
                    "block_accuracy": results["block_accuracy"],
                    "final_block_accuracy": results["final_block_accuracy"],
                    "any_block_accuracy": results["any_block_accuracy"]}
    k = computed["trained_blocks"]
    return {"source": "computed (rim plot)", "split": computed["split"], "n": computed["n"],
            "block_accuracy": computed["block_accuracy"][:k],
            "final_block_accuracy": computed["final_block_accuracy"][k],
            "any_block_accuracy": computed["any_block_accuracy"][k]}


def plot_block_accuracy(blocks: dict, path: Path) -> None:
    """Bars: accuracy of the readout after each block k = 1..K; lines: final-block and any-block accuracy."""
    fig = figure()
    ax = fig.subplots()
    ks = list(range(1, len(blocks["block_accuracy"]) + 1))
    bars = ax.bar(ks, [100 * a for a in blocks["block_accuracy"]], color="C0", alpha=0.8,
                  label="readout after block k")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(100 * blocks["final_block_accuracy"], color="C1", label="final block")
    if blocks["any_block_accuracy"] is not None:
        ax.axhline(100 * blocks["any_block_accuracy"], color="C2", linestyle="--", label="any block (oracle)")
    ax.set_xticks(ks)
    ax.set_xlabel("block k")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 108)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8)
    ax.set_title(f"per-block readout accuracy, {blocks['split']} (n = {blocks['n']}; from {blocks['source']})",
                 fontsize=9)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def plot_run(run_dir: str | Path, split: str | None = None, max_eval: int | None = None,
             checkpoint: str = "checkpoint", device: str = "auto", max_blocks: int = MAX_BLOCKS) -> list[Path]:
    """Write the run's plots into ``RUN/plots/`` (see the module docstring); returns the files written."""
    run_dir = Path(run_dir)
    cfg = load_config(RunDir(run_dir).config_path)
    out = RunDir(run_dir).plots_dir
    out.mkdir(exist_ok=True)
    written = [out / "loss.png"]
    plot_loss(run_dir, cfg, written[0])
    if not METHOD_FACTS[cfg.method.name].memory_blocks:
        return written
    result = accuracy_vs_k(run_dir, split, max_eval, checkpoint, device, max_blocks)
    (out / "accuracy_vs_k.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_accuracy_vs_k(result, out / "accuracy_vs_k.png")
    plot_block_accuracy(block_accuracy_source(run_dir, checkpoint, result), out / "block_accuracy.png")
    return written + [out / "accuracy_vs_k.json", out / "accuracy_vs_k.png", out / "block_accuracy.png"]
