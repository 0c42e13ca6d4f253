"""``rim demo``: No-CoT, CoT and RiM (``--methods all``: also pause tokens, iCoT-SI and Coconut) trained from
scratch on the built-in running-sum task, on the same budget.

Each method trains the same tiny Llama-shaped model (same data, seed and number of optimizer steps), is scored on
held-out problems, and lands in one table and in ``results.json`` (a list with one object per method:
``method, final_block_accuracy, any_block_accuracy, generated_tokens, ttft_ms, latency_ms, n``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from rim.config import load_config
from rim.eval.run import eval_run
from rim.train.loop import TrainingStopped, train

DEMO_METHODS = ("nocot", "cot", "rim")
ALL_METHODS = ("nocot", "cot", "pause", "icot", "coconut", "rim")
RESULT_KEYS = ("method", "final_block_accuracy", "any_block_accuracy", "generated_tokens", "ttft_ms", "latency_ms",
               "n")


def demo_config_path(method: str) -> Path:
    """The packaged config of one demo method."""
    path = Path(str(resources.files("rim") / "configs" / f"demo-{method}.yaml"))
    if not path.is_file():
        raise FileNotFoundError(f"no demo config for method {method!r}; demo methods: {', '.join(ALL_METHODS)}")
    return path


def format_table(rows: list[dict]) -> str:
    """A Markdown table of demo results."""
    head = "| method | final-block acc. | any-block acc. | generated tokens | TTFT (ms) | latency (ms) | n |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        anyb = "-" if r["any_block_accuracy"] is None else f"{100 * r['any_block_accuracy']:.1f}%"
        ttft, latency = ("-" if r[k] is None else f"{r[k]:.2f}" for k in ("ttft_ms", "latency_ms"))  # untimed
        lines.append(f"| {r['method']} | {100 * r['final_block_accuracy']:.1f}% | {anyb} | "
                     f"{r['generated_tokens']:.1f} | {ttft} | {latency} | {r['n']} |")
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, methods: tuple[str, ...] = DEMO_METHODS,
             overrides: list[str] | None = None) -> list[dict]:
    """Train and evaluate each method; print the table and write ``results.json``; return the rows."""
    out_dir = Path(out_dir)
    rows = []
    for method in methods:
        cfg = load_config(demo_config_path(method),
                          [f"train.seed={seed}", f"output_dir={out_dir / method}", "overwrite=true",
                           *(overrides or [])])
        print(f"== {method}: training ==", flush=True)
        try:
            train(cfg)
        except TrainingStopped as err:
            err.args = (f"demo method {method!r}: {err}",)
            raise
        metrics = eval_run(cfg.output_dir).metrics
        rows.append({key: metrics[key] for key in RESULT_KEYS})
        print(format_table(rows[-1:]), flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)  # after every method: a later failure keeps these rows
        (out_dir / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n" + format_table(rows))
    print(f"\nresults: {out_dir / 'results.json'}")
    return rows
