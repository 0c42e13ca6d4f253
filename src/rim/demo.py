"""``rim demo``: No-CoT, CoT and RiM (``--methods all``: also pause tokens, iCoT-SI and Coconut) trained from
scratch on the built-in running-sum task, on the same budget.

The methods are those of the packaged compare spec (``configs/compare-demo.yaml``, the one copy of the demo
configs), run through ``rim compare``'s machinery: each method trains the same tiny Llama-shaped model (same data,
seed and number of optimizer steps) into ``<out>/<method>``, always afresh, is scored on held-out problems, and lands
in one table and in ``results.json`` (a list with one object per method: ``method, final_block_accuracy,
any_block_accuracy, generated_tokens, ttft_ms, latency_ms, n``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rim.compare import checkpoint_of, demo_spec_path, load_spec, method_configs, prepare_run, read_results
from rim.errors import TrainingStopped
from rim.rundir import eval_name

DEMO_METHODS = ("nocot", "cot", "rim")
ALL_METHODS = ("nocot", "cot", "pause", "icot", "coconut", "rim")
RESULT_KEYS = ("method", "final_block_accuracy", "any_block_accuracy", "generated_tokens", "ttft_ms", "latency_ms",
               "n")


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
    spec = load_spec(demo_spec_path())
    unknown = [m for m in methods if m not in spec.methods]
    if unknown:
        raise FileNotFoundError(f"no demo config for method {unknown[0]!r}; demo methods: {', '.join(spec.methods)}")
    spec = replace(spec, methods={m: spec.methods[m] for m in methods}, seeds=[seed], ood=[], output_dir=out_dir)
    configs = method_configs(spec, overrides, folder=lambda label, _: label)  # every config checked first
    rows = []
    for method, (cfg,) in configs.items():
        try:
            prepare_run(cfg, [], retrain=True, advise=False)
        except TrainingStopped as err:
            err.args = (f"demo method {method!r}: {err}",)
            raise
        metrics = read_results(Path(cfg.output_dir), eval_name(None, checkpoint_of(cfg)))
        rows.append({key: metrics[key] for key in RESULT_KEYS})
        print(format_table(rows[-1:]), flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)  # after every method: a later failure keeps these rows
        (out_dir / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("\n" + format_table(rows))
    print(f"\nresults: {out_dir / 'results.json'}")
    return rows
