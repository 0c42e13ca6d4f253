"""Evaluation: final-block and any-block accuracy, per-example predictions, time to first token and latency.

- final-block accuracy: the answer decoded after ``question + K blocks`` (the deployable metric);
- any-block accuracy: correct if the readout after *any* block k = 1..K is right (an oracle "potential");
  it applies to methods with memory blocks only (None otherwise);
- latency: problems decoded one at a time (batch 1) after one warm-up; medians of the time to the first *answer*
  token (for CoT: the first token after the generated reasoning and its ``####``) and of the full answer.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from rim.config import Config
from rim.data.tasks import COT_SEPARATOR, Task
from rim.infer.generate import Generation
from rim.methods.base import Method, TokenizedExample, text_ids


@dataclass
class EvalResult:
    """Metrics of one evaluation and its per-example records."""

    metrics: dict
    records: list[dict] = field(default_factory=list)


def answer_budget(task: Task, method: Method, reasoning: int) -> int:
    """Tokens to generate: the scored task's answer budget, plus ``reasoning`` for methods that reason in text."""
    return task.max_new_tokens + (reasoning if method.cot else 0)


def longest_cot(examples: list[TokenizedExample]) -> int:
    """Tokens of the longest chain of thought among tokenized examples (0 for none)."""
    return max((len(ex.cot) for ex in examples), default=0)


def training_reasoning(cfg: Config, task: Task, method: Method, tokenizer) -> int:
    """Room for text reasoning: the tokens of the longest chain of thought among the run's training examples, as
    the checkpoint recorded it (``method.reasoning``) or else measured on ``data.train_split`` (its first
    ``data.max_train``); 0 for methods that answer directly.

    The budget never comes from the scored split: that would size it from the gold reasoning being scored, and
    out-of-distribution problems (GSM-Hard, SVAMP) carry no steps at all, which left a CoT model no room to reason.
    """
    if not method.cot:
        return 0
    if method.reasoning is not None:
        return method.reasoning
    examples = task.load(cfg.data.train_split)[: cfg.data.max_train]
    return max((len(text_ids(tokenizer, task.cot_text(ex))) for ex in examples), default=0)


def answer_start(tokenizer, tokens: list[int], cot: bool) -> int:
    """Index of the first answer token among generated tokens: 0, or for CoT the token after ``####``."""
    if not cot:
        return 0
    for i in range(1, len(tokens) + 1):
        if COT_SEPARATOR in tokenizer.decode(tokens[:i], skip_special_tokens=True):
            return i
    return len(tokens)  # no separator: the answer, if any, comes last


def measure_latency(model: nn.Module, tokenizer, method: Method, prompts: list[list[int]], max_new_tokens: int
                    ) -> dict:
    """Median time to the first answer token and to the full answer, batch 1, after one warm-up run."""
    if not prompts:
        return {"ttft_ms": None, "latency_ms": None}
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    method.generate(model, [prompts[0]], pad, eos, max_new_tokens)  # warm-up: allocator, kernels, caches
    first, total = zip(*(answer_times(tokenizer, method.generate(model, [p], pad, eos, max_new_tokens), method.cot)
                         for p in prompts))
    return {"ttft_ms": statistics.median(first), "latency_ms": statistics.median(total)}


def answer_times(tokenizer, gen: Generation, cot: bool) -> tuple[float, float]:
    """(time to the first answer token, time to the whole answer) in ms of a batch-1 generation."""
    start = min(answer_start(tokenizer, gen.tokens[0], cot), len(gen.step_s) - 1)
    return gen.step_s[start] * 1e3, gen.total_s * 1e3


def shard() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(model: nn.Module, tokenizer, task: Task, method: Method, examples: list[TokenizedExample],
             blocks: int, batch_size: int = 64, any_block: bool = True, latency_examples: int = 20,
             reasoning: int | None = None) -> EvalResult:
    """Score ``examples``; decode after every block too when the method has blocks and ``any_block`` is set.

    ``reasoning``: room for text reasoning in the budget (``training_reasoning``); None sizes it from the longest
    reasoning among ``examples`` themselves (a quick look; rim's commands pass the run's).
    Under torch.distributed every process decodes every world-th example and the records are gathered, so all
    processes return the same records and accuracies; latency is timed on rank 0 only (None elsewhere).
    """
    model.eval()
    if reasoning is None:  # from all examples: the same on every process
        reasoning = longest_cot(examples)
    budget = answer_budget(task, method, reasoning)
    rank, world = shard()
    mine = list(range(rank, len(examples), world))
    per_block = method.any_block and any_block
    records = score(model, tokenizer, task, method, [examples[i] for i in mine], blocks, budget, batch_size, per_block)
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, list(zip(mine, records)))
        records = [rec for _, rec in sorted((pair for part in parts for pair in part), key=lambda p: p[0])]
    metrics = summarize(records, method, blocks, per_block)
    prompts = [method.prompt(ex, blocks) for ex in examples[:latency_examples]] if rank == 0 else []
    metrics.update(measure_latency(model, tokenizer, method, prompts, budget))
    return EvalResult(metrics, records)


def score(model: nn.Module, tokenizer, task: Task, method: Method, examples: list[TokenizedExample], blocks: int,
          budget: int, batch_size: int, per_block: bool) -> list[dict]:
    """One record per example: prediction, output, correctness and, with ``per_block``, every block's readout."""
    final = method.decode(model, [method.prompt(ex, blocks) for ex in examples], tokenizer.pad_token_id,
                          tokenizer.eos_token_id, budget, batch_size)
    readouts = method.block_readouts(model, examples, blocks, tokenizer.pad_token_id, tokenizer.eos_token_id, budget,
                                     batch_size) if per_block else []
    records = []
    for i, ex in enumerate(examples):
        text = tokenizer.decode(final[i], skip_special_tokens=True)
        pred = task.extract_answer(text, cot=method.cot)
        rec = {"question": ex.example.question, "gold": ex.example.answer, "prediction": pred, "output": text,
               "correct": task.is_correct(pred, ex.example.answer),
               "generated_tokens": min(len(final[i]) + 1, budget)}  # + its EOS, unless the budget stopped it
        if per_block:
            texts = [task.extract_answer(tokenizer.decode(t, skip_special_tokens=True)) for t in readouts[i]]
            rec["block_readouts"] = texts
            rec["block_correct"] = [task.is_correct(r, ex.example.answer) for r in texts]
        records.append(rec)
    return records


def summarize(records: list[dict], method: Method, blocks: int, per_block: bool) -> dict:
    """Accuracies and mean generated tokens of scored records."""
    n = len(records)
    metrics = {
        "method": method.name, "n": n, "blocks": blocks if method.any_block else None,
        "final_block_accuracy": sum(r["correct"] for r in records) / n,
        "any_block_accuracy": sum(any(r["block_correct"]) for r in records) / n if per_block else None,
        "generated_tokens": sum(r["generated_tokens"] for r in records) / n,
    }
    if per_block:
        metrics["block_accuracy"] = [sum(r["block_correct"][k] for r in records) / n for k in range(blocks)]
    return metrics


def write_predictions(records: list[dict], path: str | Path) -> None:
    """Per-example predictions as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
