"""``rim analyze RUN``: what the memory blocks hold across checkpoints, and whether a block's state knows when its
readout is right.

The *block state* of block k is the penultimate layer's hidden state (``hidden_states[-2]``, the output of layer
L-1) at the block's closing ``</b>``, the position that predicts the first token of readout k. The prompt is the
inference prompt ``question + K blocks`` (the trained K), so it is the state inference computes.

- PCA (``analysis/pca.png``): block states of the probe-split questions, one column per checkpoint (``init``: the
  model before training, rebuilt from the run's config and seed; then every ``checkpoints/step-N`` and the final
  ``checkpoint``), coloured by block (top row) and by gold answer (bottom row). Collapse statistics per
  checkpoint: the mean cosine similarity between the states of different questions at the same block (near 1:
  collapsed, the blocks hold the same thing whatever the question; near 0: question-specific), the mean distance
  between different questions at the same block (``across``) and between the blocks of one question
  (``within``), their ratio ``question_specificity`` (below 1: the block index matters more than the question),
  and the variance share of the top two principal components.
- Probes (last checkpoint of the list): per block, an L2-regularised logistic regression on the block state that
  predicts whether that block's readout is right, fitted on the probe split and scored on the score split
  (questions that occur in both are dropped from the probe split), with AUROC and AUPRC; then probe-based answer
  selection (each problem takes the readout of the block whose probe is most confident) against final-block and
  any-block accuracy, and against the block that is best on the probe split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F

from rim.config import Config, ConfigError, inference_blocks, load_config
from rim.data.tasks import Example, Task, make_task
from rim.eval.evaluate import evaluate
from rim.infer.generate import left_pad
from rim.methods.base import Method, TokenizedExample, make_method, method_class
from rim.rundir import RunDir, step_name

POSITION = "penultimate layer (hidden_states[-2]) at the closing </b> of each block"


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve: the chance that a random positive scores above a random negative, ties counting
    one half (Mann-Whitney U with mid-ranks). None when only one class is present.

    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> auroc([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1])   # 2 wins and 2 ties out of 4 pairs
    0.75
    """
    n_pos = sum(map(bool, labels))
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    rank_sum, below = 0.0, 0
    for _, group in groupby(sorted(zip(scores, labels), key=lambda p: p[0]), key=lambda p: p[0]):
        group = list(group)
        rank_sum += (below + (len(group) + 1) / 2) * sum(bool(y) for _, y in group)  # mid-rank of the tie group
        below += len(group)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auprc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the precision-recall curve as average precision: the sum over distinct thresholds, highest first,
    of recall gained x precision there; tied scores form one threshold. None without positives.

    >>> round(auprc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 4)   # 0.5 x 1 + 0.5 x 2/3
    0.8333
    >>> auprc([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1])   # 0.5 x 1 + 0.5 x 2/4
    0.75
    """
    n_pos = sum(map(bool, labels))
    if not n_pos:
        return None
    area, tp, seen = 0.0, 0, 0
    for _, group in groupby(sorted(zip(scores, labels), key=lambda p: -p[0]), key=lambda p: p[0]):
        group = list(group)
        gained = sum(bool(y) for _, y in group)
        tp, seen = tp + gained, seen + len(group)
        area += gained / n_pos * tp / seen
    return area


@dataclass
class Probe:
    """A fitted logistic regression on standardised features: P(right) = sigmoid(((x - mean) / std) @ w + b)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((x.double() - self.mean) / self.std) @ self.weight + self.bias)


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 0.1, max_iter: int = 200) -> Probe:
    """Minimise mean BCE + l2/2 ||w||² (bias not penalised) with L-BFGS on standardised ``x`` (n, d) for 0/1 ``y``.

    With one class only the probe is the smoothed base rate (w = 0), since the unpenalised bias would diverge.
    """
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / std
    rate = (y.sum() + 0.5) / (len(y) + 1)
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.log(rate / (1 - rate)).requires_grad_(True)
    if y.min() < y.max():
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ weight + bias, y) + l2 / 2 * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return Probe(mean, std, weight.detach(), bias.detach())


def block_ends(length: int, blocks: int, width: int) -> list[int]:
    """Columns of the closing token of blocks 1..K in a left-padded row of ``length`` that ends with the K blocks.

    >>> block_ends(10, 2, 4)   # ... <b> <m> <m> </b> <b> <m> <m> </b>
    [5, 9]
    """
    return [length - 1 - (blocks - k) * width for k in range(1, blocks + 1)]


@torch.no_grad()
def block_states(model, tokenizer, method: Method, examples: list[TokenizedExample], blocks: int,
                 batch_size: int = 64) -> torch.Tensor:
    """Block states (n, K, d) in float32 on the CPU: see the module docstring."""
    device = next(model.parameters()).device
    width = len(method.prompt(examples[0], 1)) - len(method.prompt(examples[0], 0))
    out = []
    for i in range(0, len(examples), batch_size):
        ids, mask = left_pad([method.prompt(ex, blocks) for ex in examples[i:i + batch_size]],
                             tokenizer.pad_token_id, device)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       output_hidden_states=True).hidden_states[-2]
        out.append(hidden[:, block_ends(ids.shape[1], blocks, width)].float().cpu())
    return torch.cat(out)


def _mean_off_diagonal(pairs: torch.Tensor) -> float | None:
    """Mean over i != j of (..., m, m) pairwise values; None with fewer than two items."""
    m = pairs.shape[-1]
    if m < 2:
        return None
    off = pairs.sum() - pairs.diagonal(dim1=-2, dim2=-1).sum()
    return (off / (pairs[..., 0, 0].numel() * m * (m - 1))).item()


def pca(states: torch.Tensor, n_components: int = 2) -> tuple[torch.Tensor, list[float]]:
    """Coordinates of the (n, K, d) states on their top principal components, (n, K, c), and each component's share
    of the variance."""
    flat = states.reshape(-1, states.shape[-1]).double()
    u, s, _ = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)
    share = (s.square() / s.square().sum().clamp(min=1e-30))[:n_components]
    return (u[:, :n_components] * s[:n_components]).float().reshape(*states.shape[:2], -1), share.tolist()


def _distances(x: torch.Tensor) -> torch.Tensor:
    # not through matrix products: for near-identical (collapsed) states those cancel badly
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def collapse_stats(states: torch.Tensor) -> dict:
    """For (n, K, d) block states: the mean cosine similarity of different questions' states at the same block
    (1: collapsed, every question gets the same state up to scale), the mean distance between questions at one
    block (``across``) and between the blocks of one question (``within``), and their ratio.

    >>> stats = collapse_stats(torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]))  # questions 2 apart, blocks 1 apart
    >>> [stats[k] for k in ("across_question_distance", "within_question_distance", "question_specificity")]
    [2.0, 1.0, 2.0]
    """
    by_block = states.transpose(0, 1)  # (K, n, d)
    unit = F.normalize(by_block, dim=-1)
    across = _mean_off_diagonal(_distances(by_block))  # (K, n, n)
    within = _mean_off_diagonal(_distances(states))  # (n, K, K)
    return {"across_question_cosine": _mean_off_diagonal(unit @ unit.transpose(1, 2)),
            "across_question_distance": across, "within_question_distance": within,
            "question_specificity": across / within if across is not None and within else None}


def probe_report(fit_states: torch.Tensor, fit_correct: torch.Tensor, score_states: torch.Tensor,
                 score_correct: torch.Tensor, l2: float = 0.1) -> dict:
    """Per-block probes fitted on (states, readout right) of one split and scored on another; then probe-based
    selection: each scored problem answers with the block whose probe gives the highest P(right)."""
    n_blocks = fit_states.shape[1]
    per_block, confidence = [], []
    for k in range(n_blocks):
        p = fit_probe(fit_states[:, k], fit_correct[:, k], l2).predict(score_states[:, k])
        confidence.append(p)
        scores, labels = p.tolist(), score_correct[:, k].tolist()
        per_block.append({"block": k + 1, "fit_accuracy": fit_correct[:, k].float().mean().item(),
                          "constant_probe": bool(fit_correct[:, k].all() or not fit_correct[:, k].any()),
                          "score_accuracy": score_correct[:, k].float().mean().item(),
                          "auroc": auroc(scores, labels), "auprc": auprc(scores, labels)})
    chosen = torch.stack(confidence, dim=1).argmax(1)
    best = int(fit_correct.float().mean(0).argmax())  # chosen on the probe split, never the scored one
    rows = torch.arange(len(chosen))
    return {"l2": l2, "per_block": per_block, "selection": {
        "probe_selected_accuracy": score_correct[rows, chosen].float().mean().item(),
        "final_block_accuracy": score_correct[:, -1].float().mean().item(),
        "any_block_accuracy": score_correct.any(1).float().mean().item(),
        "best_fit_block": best + 1, "best_fit_block_accuracy": score_correct[:, best].float().mean().item(),
        "chosen_blocks": torch.bincount(chosen, minlength=n_blocks).tolist()}}


def checkpoint_names(run_dir: str | Path, which: str = "all") -> list[str]:
    """``all``: ``init`` (before training), every ``checkpoints/step-N``, the final ``checkpoint`` (the step-N of
    the last step is the same weights and is left out); otherwise a comma-separated list of names (``init``,
    ``checkpoint``, ``best``, ``checkpoints/step-N``)."""
    if which != "all":
        return [name.strip() for name in which.split(",") if name.strip()]
    run = RunDir(run_dir)
    done = next((e["steps"] for e in run.events() if e.get("event") == "done"), None)
    return ["init", *(name for name in run.checkpoints() if done is None or name != step_name(done))]


def load_checkpoint(run_dir: Path, name: str, device: str = "auto") -> tuple[torch.nn.Module, object, Method]:
    """(model in eval mode, tokenizer, method) of a checkpoint of the run; ``init`` is the untrained model that
    training started from (the tiny model from the run's seed; a pretrained base with the new tokens added)."""
    from rim.eval.run import load_run, pick_device
    from rim.models.load import build_model

    if name != "init":
        _, model, tokenizer, method, _ = load_run(run_dir, device, name)
        return model, tokenizer, method
    cfg = load_config(RunDir(run_dir).config_path)
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    model, tokenizer, _ = build_model(cfg.model, task, cfg.train.seed, method_class(cfg.method.name).special_tokens)
    return model.to(pick_device(device)).eval(), tokenizer, make_method(cfg.method, tokenizer)


def held_out_examples(task: Task, probe_split: str, score_split: str, limit: int | None
                      ) -> tuple[list[Example], list[Example], int]:
    """(probe, score) examples, at most ``limit`` each, with no question in both; also how many probe-split
    examples were dropped for sharing a question with the score split."""
    if probe_split == score_split:
        raise ConfigError(f"--probe-split and --score-split are both {probe_split!r}; the probes must be fitted on "
                          "other problems than they are scored on")
    score = task.load(score_split)[:limit]
    scored = {ex.question for ex in score}
    probe = task.load(probe_split)
    kept = [ex for ex in probe if ex.question not in scored]
    if not score or not kept:
        raise ConfigError(f"no problems to {'score' if not score else 'fit the probes'} on: the {score_split!r} split "
                          f"has {len(score)}, and {len(kept)} of the {probe_split!r} split's {len(probe)} are not in "
                          "it; choose other splits (--probe-split, --score-split)")
    return kept[:limit], score, len(probe) - len(kept)


def readout_correct(model, tokenizer, task: Task, method: Method, examples: list[TokenizedExample], blocks: int,
                    batch_size: int) -> torch.Tensor:
    """(n, K) bool: whether the readout after each block is right (one decode per block)."""
    records = evaluate(model, tokenizer, task, method, examples, blocks, batch_size, True, 0).records
    return torch.tensor([r["block_correct"] for r in records], dtype=torch.bool)


def analyze_run(run_dir: str | Path, checkpoints: str = "all", probe_split: str = "valid",
                score_split: str = "test", max_examples: int | None = None, device: str = "auto",
                l2: float = 0.1) -> dict:
    """Run the analysis (module docstring); writes ``analysis/analysis.json``, ``analysis.md``, ``pca.png`` and
    ``questions.json`` (the probe and score questions) into the run directory and returns the JSON data."""
    run_dir = Path(run_dir)
    cfg = load_config(RunDir(run_dir).config_path)
    if not method_class(cfg.method.name).any_block:
        raise ConfigError(f"rim analyze looks at memory blocks; method {cfg.method.name!r} has none")
    names = checkpoint_names(run_dir, checkpoints)
    if not names:
        raise FileNotFoundError(f"{run_dir}: no checkpoints to analyze")
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    probe, score, dropped = held_out_examples(task, probe_split, score_split, max_examples)
    blocks = inference_blocks(cfg)
    panels, rows, report = [], [], {}
    for name in names:
        model, tokenizer, method = load_checkpoint(run_dir, name, device)
        tokenized = [method.tokenize(task, tokenizer, ex, cfg.data.prompt_format) for ex in probe]
        states = block_states(model, tokenizer, method, tokenized, blocks, cfg.eval.batch_size)
        coords, share = pca(states)
        rows.append({"checkpoint": name, **collapse_stats(states), "explained_variance": share})
        panels.append((name, coords, rows[-1]["across_question_cosine"]))
        if name == names[-1]:
            scored = [method.tokenize(task, tokenizer, ex, cfg.data.prompt_format) for ex in score]
            report = probe_report(
                states, readout_correct(model, tokenizer, task, method, tokenized, blocks, cfg.eval.batch_size),
                block_states(model, tokenizer, method, scored, blocks, cfg.eval.batch_size),
                readout_correct(model, tokenizer, task, method, scored, blocks, cfg.eval.batch_size), l2)
        del model
    result = {"run": str(run_dir), "task": task.name, "position": POSITION, "blocks": blocks,
              "pca": {"split": probe_split, "n": len(probe), "checkpoints": rows},
              "probe": {"checkpoint": names[-1], "probe_split": probe_split, "score_split": score_split,
                        "n_probe": len(probe), "n_score": len(score), "dropped_shared_questions": dropped, **report}}
    out = RunDir(run_dir).analysis_dir
    out.mkdir(exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "questions.json").write_text(json.dumps({"probe": [ex.question for ex in probe],
                                                    "score": [ex.question for ex in score]}), encoding="utf-8")
    (out / "analysis.md").write_text(summary(result), encoding="utf-8")
    plot_pca(panels, [ex.answer for ex in probe], cfg, out / "pca.png")
    return result


def plot_pca(panels: list[tuple[str, torch.Tensor, float | None]], answers: list[str], cfg: Config,
             path: Path) -> None:
    """One column per checkpoint: PC1 vs PC2 of the block states, coloured by block (top) and gold answer (bottom;
    the ten most common answers, the rest grey)."""
    from collections import Counter

    from matplotlib.lines import Line2D

    from rim.plots import figure

    fig = figure(3.0 * len(panels) + 1.2, 6.2, layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False)
    common = [a for a, _ in Counter(answers).most_common(10)]
    answer_color = [f"C{common.index(a)}" if a in common else "lightgray" for a in answers]
    for col, (name, coords, cosine) in enumerate(panels):
        n, k, _ = coords.shape
        x, y = coords[..., 0].flatten().tolist(), coords[..., 1].flatten().tolist()
        dots = axes[0][col].scatter(x, y, s=5, c=[b for _ in range(n) for b in range(1, k + 1)], cmap="viridis",
                                    vmin=1, vmax=k)
        axes[1][col].scatter(x, y, s=5, c=[color for color in answer_color for _ in range(k)])
        axes[0][col].set_title(f"{name}\ncosine across questions {_num(cosine)}", fontsize=8)
        for ax in axes[:, col]:
            ax.tick_params(labelsize=6)
            ax.set_xlabel("PC1", fontsize=7)
    axes[0][0].set_ylabel("PC2 (colour: block)", fontsize=7)
    axes[1][0].set_ylabel("PC2 (colour: gold answer)", fontsize=7)
    fig.colorbar(dots, ax=axes[0].tolist(), label="block k", ticks=range(1, k + 1), shrink=0.9)
    handles = [Line2D([], [], marker="o", linestyle="", color=f"C{i}", label=a) for i, a in enumerate(common)]
    axes[1][-1].legend(handles=handles, title="gold answer", fontsize=6, title_fontsize=7, loc="center left",
                       bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{cfg.method.name} on {cfg.data.task}: block states, {POSITION}; PCA per checkpoint", fontsize=9)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary(result: dict) -> str:
    """The analysis as Markdown: collapse statistics per checkpoint, probe metrics per block, selection."""
    pca_part, probe = result["pca"], result["probe"]
    lines = [f"# Analysis of {result['run']}", "",
             f"Block states: {result['position']}; K = {result['blocks']}.", "",
             f"## Block states across checkpoints ({pca_part['split']}, n = {pca_part['n']})", "",
             "| checkpoint | cosine across questions | distance across questions | distance within a question | "
             "question specificity | PC1 / PC2 variance (%) |", "|---|---|---|---|---|---|"]
    for row in pca_part["checkpoints"]:
        shares = " / ".join(_pct(v) for v in row["explained_variance"])
        lines.append(f"| {row['checkpoint']} | {_num(row['across_question_cosine'])} | "
                     f"{_num(row['across_question_distance'])} | "
                     f"{_num(row['within_question_distance'])} | {_num(row['question_specificity'])} | {shares} |")
    lines += ["", f"## Probes: is block k's readout right? ({probe['checkpoint']}; fitted on {probe['probe_split']} "
              f"n = {probe['n_probe']}, scored on {probe['score_split']} n = {probe['n_score']}, L2 {probe['l2']})",
              "", "| block | readout acc. fit (%) | readout acc. scored (%) | AUROC | AUPRC |", "|---|---|---|---|---|"]
    for row in probe["per_block"]:
        lines.append(f"| {row['block']} | {_pct(row['fit_accuracy'])} | {_pct(row['score_accuracy'])} | "
                     f"{_num(row['auroc'])} | {_num(row['auprc'])} |")
    constant = [str(row["block"]) for row in probe["per_block"] if row["constant_probe"]]
    if constant:
        lines += ["", f"Blocks {', '.join(constant)}: every readout on {probe['probe_split']} is right (or every one "
                  "wrong), so the probe is the constant base rate (AUROC 0.5)."]
    sel = probe["selection"]
    lines += ["", f"Answer selection on {probe['score_split']}: probe-selected block "
              f"{_pct(sel['probe_selected_accuracy'])}%, final block {_pct(sel['final_block_accuracy'])}%, "
              f"best block on {probe['probe_split']} (block {sel['best_fit_block']}) "
              f"{_pct(sel['best_fit_block_accuracy'])}%, any block (oracle) {_pct(sel['any_block_accuracy'])}%.", ""]
    return "\n".join(lines)
