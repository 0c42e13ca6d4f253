"""Speed against the baselines (``rim bench``): inference latency of every method, and the training step of RiM
against a plain causal step. Every comparison is a ratio of two numbers measured in the same run on the same device.

    rim bench all --shape tiny                              # CPU, a few minutes
    rim bench all --shape llama-3.2-1b --out runs/bench     # GPU; random weights (speed does not depend on them)
    rim bench latency --static-cache --compile              # + static KV cache, compiled decoding steps

Everything runs through the real code paths: prompts from ``Method.prompt``, decoding through ``Method.generate``,
the answers after every block through ``Method.block_readouts`` (RiM's together and the base K decodes), RiM's
training step through ``Method.forward`` and ``step_loss``. Each measurement: warm-up runs, then repeats,
each between two device synchronisations; medians. On a GPU, training runs under bf16 autocast (as ``rim train``)
and inference in bf16 weights; on a CPU both in fp32. Writes ``bench-<shape>-<suite>.json`` (numbers, ratios,
targets and the environment: device, versions, commit) and the same as a Markdown table.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from rim.bench.cost import CostSettings, bench_epoch, bench_sweep, matmul_rate, mfu_measured
from rim.bench.latency import bench_latency, bench_readouts
from rim.bench.report import check_targets, markdown, ratios
from rim.bench.shapes import REASONING_TOKENS, SHAPES, BenchSettings, Shape, bench_tokens, shape_model
from rim.bench.timing import environment
from rim.bench.train import bench_train


SUITES = ("latency", "train", "all", "epoch", "sweep")


def run_bench(suite: str = "all", shape: str = "tiny", device: str = "auto", out_dir: str | Path = "runs/bench",
              settings: BenchSettings | None = None, cost: CostSettings | None = None) -> dict:
    """Run ``suite`` (latency, train, all, or epoch and sweep of ``rim.bench.cost``) on ``shape``; write JSON and
    Markdown into ``out_dir``; return it."""
    if suite not in SUITES:
        raise ValueError(f"unknown bench suite {suite!r}; choose from {', '.join(SUITES)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    s = settings or BenchSettings()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    infer_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    mode = s.train_mode if s.train_mode != "auto" else ("full" if shape.startswith("tiny") else "lora")
    start = time.perf_counter()
    cost = cost or CostSettings()
    results: dict = {"suite": suite, "shape": shape, "shape_config": asdict(SHAPES[shape]), "settings": asdict(s),
                     "environment": environment(dev, infer_dtype)}
    out, stem = Path(out_dir), f"bench-{shape}-{suite}"
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a later part that fails or runs out of time leaves the earlier numbers
        results.update(ratios=ratios(results), wall_s=time.perf_counter() - start)
        results["targets"] = check_targets(results["ratios"], shape)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(markdown(results), encoding="utf-8")

    if suite != "latency":  # the dense rate MFU is measured against, on this card in this run
        results["matmul"] = matmul_rate(dev)
    if suite == "epoch":
        results["epoch"] = {}
        bench_epoch(shape, dev, cost, mode, results["epoch"], save)
        return results
    model, tokenizer = shape_model(SHAPES[shape], dev, s.seed)
    if suite == "sweep":
        new_ids = tokenizer.convert_tokens_to_ids(list(bench_tokens()))
        results["sweep"] = {}
        bench_sweep(model, tokenizer, new_ids, s, cost, dev, mode, results["matmul"]["flops"], results["sweep"],
                    save)
        return results
    if suite in ("latency", "all"):
        results["latency"] = bench_latency(model.to(infer_dtype), tokenizer, s, dev)
        results["readouts"] = bench_readouts(model, tokenizer, s, dev)
        model.float()
        save()
    if suite in ("train", "all"):
        new_ids = tokenizer.convert_tokens_to_ids(list(bench_tokens()))
        results["train"] = {}
        bench_train(model, tokenizer, new_ids, s, dev, mode, results["train"], save)
        for rows in results["train"].values():  # MFU against the rate measured above, not a table of peaks
            for row in (rows.values() if isinstance(rows, dict) else ()):
                if isinstance(row, dict):
                    mfu_measured(row, results["train"]["parameters"], results["matmul"]["flops"], mode == "lora")
        save()
    return results


__all__ = ["SHAPES", "SUITES", "REASONING_TOKENS", "BenchSettings", "CostSettings", "Shape", "markdown", "run_bench"]
