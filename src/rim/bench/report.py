"""The ratios of a bench run, the GPU targets they are checked against, and the Markdown report."""

from __future__ import annotations

import math

from rim.bench.cost import epoch_markdown, rate_text, sweep_markdown
from rim.bench.shapes import STATIC_METHODS

# (ratio, comparison, bound, shape it applies to or None for every shape); they are GPU targets. Training (issue 17)
# is held to the card itself: MFU against the matmul rate measured in the same run, and the masked pass to 90% of
# the bound its token ratio sets; the older 1.5x (Llama) and 7x (masked pass) targets are retired.
TARGETS = (
    ("ttft_rim_over_nocot_b1", "<=", 1.05, None),
    ("ttft_cot_over_rim_b1", ">=", 27.0, None),
    ("ttft_coconut_over_rim_b1", ">=", 6.0, None),
    ("train_stage1_rim_mfu_measured", ">=", 0.55, "llama-3.2-1b"),
    ("train_stage2_rim_mfu_measured", ">=", 0.55, "llama-3.2-1b"),
    ("train_stage1_fastest_over_plain", ">=", 3.0, "smollm2-135m"),
    ("train_stage2_fastest_over_plain", ">=", 3.0, "smollm2-135m"),
    ("masked_over_separate_of_bound", ">=", 0.9, None),
    ("masked_over_separate_train_of_bound", ">=", 0.9, None),
    ("epoch_rim_over_cot", "<=", 1.5, None),
    ("epoch_coconut_over_rim", ">=", 3.0, None),
)


def ratios(results: dict) -> dict[str, float]:
    """Every comparison as one number (> 1: the first is slower or, for training, faster)."""
    out = {}
    for key, rows in results.get("latency", {}).items():
        for metric in ("ttft", "latency"):
            value = {name: row[f"{metric}_ms"] for name, row in rows.items()}
            out[f"{metric}_rim_over_nocot_{key}"] = value["rim"] / value["nocot"]
            for other in ("cot", "coconut", "pause"):
                out[f"{metric}_{other}_over_rim_{key}"] = value[other] / value["rim"]
            for variant in ("static", "compiled"):
                if f"rim_{variant}" in value:
                    for name in STATIC_METHODS:
                        out[f"{metric}_{name}_{variant}_over_{name}_{key}"] = value[f"{name}_{variant}"] / value[name]
                    out[f"{metric}_rim_{variant}_over_nocot_{variant}_{key}"] = (value[f"rim_{variant}"]
                                                                                 / value[f"nocot_{variant}"])
    for key, row in results.get("readouts", {}).items():
        out[f"readouts_k_decodes_over_one_pass_{key}"] = row["k_decodes_ms"] / row["one_pass_ms"]
        for variant in ("static", "compiled"):
            if f"one_pass_{variant}_ms" in row:
                out[f"readouts_one_pass_{variant}_over_one_pass_{key}"] = (row[f"one_pass_{variant}_ms"]
                                                                          / row["one_pass_ms"])
    train = results.get("train") or {}  # rows measured so far (a run cut short has fewer)
    for i, stage in enumerate(("grounding", "refinement"), start=1):
        speed = {name: row["tokens_per_s"] for name, row in train.get(stage, {}).items()
                 if isinstance(row, dict) and "tokens_per_s" in row}  # not the rows that failed
        rim = {name: value for name, value in speed.items() if name.startswith("rim_")}
        if "plain" not in speed or not rim:
            continue
        if "rim_supervised" in rim:
            out[f"train_stage{i}_rim_over_plain"] = rim["rim_supervised"] / speed["plain"]
            if "rim_full" in rim:
                out[f"train_stage{i}_supervised_over_full"] = rim["rim_supervised"] / rim["rim_full"]
        for name, value in rim.items():
            if name != "rim_supervised":
                out[f"train_stage{i}_{name[4:]}_over_plain"] = value / speed["plain"]
            if name.startswith("rim_compiled") and f"plain{name[3:]}" in speed:  # both through compiled blocks
                out[f"train_stage{i}_{name[4:]}_over_plain{name[3:]}"] = value / speed[f"plain{name[3:]}"]
        # the target: RiM's step as fast as its options make it
        out[f"train_stage{i}_fastest_over_plain"] = max(rim.values()) / speed["plain"]
    passes = train.get("masked_vs_separate")
    if passes:
        out["masked_over_separate"] = passes["separate_ms"] / passes["one_masked_ms"]
        # where the passes are compute-bound, the ratio cannot exceed the ratio of the tokens they process
        out["masked_over_separate_tokens"] = passes["separate_tokens"] / passes["masked_tokens"]
    passes = train.get("masked_vs_separate_train")
    if passes:
        out["masked_over_separate_train"] = passes["separate_ms"] / passes["one_masked_ms"]
    if "masked_over_separate_tokens" in out:  # the share of the token-ratio bound each pass reaches
        for key in ("masked_over_separate", "masked_over_separate_train"):
            if key in out:
                out[f"{key}_of_bound"] = out[key] / out["masked_over_separate_tokens"]
    for i, stage in enumerate(("grounding", "refinement"), start=1):  # RiM's best MFU against the measured rate
        mfus = [row["mfu_measured"] for name, row in train.get(stage, {}).items()
                if name.startswith("rim_") and isinstance(row, dict) and "mfu_measured" in row]
        if mfus:
            out[f"train_stage{i}_rim_mfu_measured"] = max(mfus)
    out.update((results.get("epoch") or {}).get("ratios", {}))
    return out


def check_targets(values: dict[str, float], shape: str) -> list[dict]:
    """The issue's targets that apply to this shape, with the measured value and whether it is met."""
    rows = []
    for name, op, bound, only in TARGETS:
        if name in values and only in (None, shape):
            value = values[name]
            rows.append({"ratio": name, "target": f"{op} {bound:g}", "value": value,
                         "met": value <= bound if op == "<=" else value >= bound})
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    """The results as Markdown tables: latency, training, ratios and targets, and the environment."""
    env, lines = results["environment"], []
    lines += [f"## rim bench {results['suite']}: shape {results['shape']}", "",
              f"{env['device']} ({env['device_type']}, {env['dtype']} inference), torch {env['torch']}, "
              f"transformers {env['transformers']}, peft {env['peft']}, commit {(env['commit'] or '?')[:10]}"
              f"{' + uncommitted changes' if env['uncommitted_changes'] else ''}, {env['cpu_count']} CPUs, "
              f"load average {_fmt((env['load_average'] or [None])[0])}; {results['wall_s']:.0f} s in all.", ""]
    for key, rows in results.get("latency", {}).items():
        lines += [f"Latency at batch {key[1:]} (medians):", "",
                  "| method | prompt tokens | generated | TTFT ms | latency ms |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['prompt_tokens']} | {r['generated_tokens']} | {_fmt(r['ttft_ms'])} | "
                  f"{_fmt(r['latency_ms'])} |" for name, r in rows.items()]
        lines.append("")
    if results.get("readouts"):
        extra = [p for p in ("one_pass_static", "one_pass_compiled") if f"{p}_ms" in next(iter(
            results["readouts"].values()))]
        titles = {"one_pass_static": "all K, static cache ms", "one_pass_compiled": "all K, compiled steps ms"}
        lines += [f"RiM's answers after every block k = 1..{results['settings']['blocks']} (medians):", "",
                  "| batch | all K together ms | K decodes ms |" + "".join(f" {titles[p]} |" for p in extra),
                  "|---|---|---|" + "---|" * len(extra)]
        lines += [f"| {key[1:]} | {_fmt(r['one_pass_ms'])} | {_fmt(r['k_decodes_ms'])} |"
                  + "".join(f" {_fmt(r[f'{p}_ms'])} |" for p in extra) for key, r in results["readouts"].items()]
        lines.append("")
    train = results.get("train")
    if train:
        lines += [f"Training step ({train['train_mode']}; {train['trainable_parameters']:,} trainable parameters, "
                  f"batch {results['settings']['train_batch']}; medians):", "",
                  "| stage | step | tokens (supervised) | step ms | tokens/s | peak MiB | MFU |",
                  "|---|---|---|---|---|---|---|"]
        for stage in ("grounding", "refinement"):
            rows = train.get(stage, {})
            for name, r in rows.items():
                if not isinstance(r, dict):
                    continue
                if "error" in r:
                    error = r["error"].splitlines()[0][:200].replace("|", "\\|")
                    lines.append(f"| {stage} | {name} | failed: {error} | - | - | - | - |")
                    continue
                skipped = f" (CUDA graphs skipped {r['cudagraph_skips']}x)" if r.get("cudagraph_skips") else ""
                tokens = f"{rows['tokens']} ({rows['supervised_tokens']})"
                if "_compiled" in name and "padded_tokens" in rows:
                    tokens += f", padded to {rows['padded_tokens']}"
                lines.append(f"| {stage} | {name}{skipped} | {tokens} | {_fmt(r['step_ms'])} | "
                             f"{r['tokens_per_s']:,.0f} | {_fmt(r['peak_memory_mb'], 0)} | {_fmt(r['mfu'], 3)} |")
        profiled = [(stage, name, r["profile"]) for stage in ("grounding", "refinement")
                    for name, r in train.get(stage, {}).items() if isinstance(r, dict) and "profile" in r]
        if profiled:
            lines += ["", "One more step of each row under torch.profiler (wall time with the profiler's overhead):",
                      "", "| stage | step | wall ms | aten ops (top level) | kernels | kernel ms | device busy |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {stage} | {name} | {_fmt(p['wall_ms'])} | {p['aten_ops']} | {p['kernels']} | "
                      f"{_fmt(p['device_ms'])} | {_fmt(p['device_busy'])} |" for stage, name, p in profiled]
        for key, what in (("masked_vs_separate", "forward only"), ("masked_vs_separate_train", "with the backward")):
            p = train.get(key)
            if p is not None:
                lines += ["", f"All K readouts, {what}: one masked pass ({p['masked_tokens']} tokens) "
                              f"{_fmt(p['one_masked_ms'])} ms; K separate passes ({p['separate_tokens']} tokens) "
                              f"{_fmt(p['separate_ms'])} ms."]
        lines.append("")
    if results.get("epoch"):
        lines += epoch_markdown(results["epoch"])
    if results.get("sweep"):
        lines += sweep_markdown(results["sweep"], results["matmul"])
    if results.get("matmul"):
        m = results["matmul"]
        lines += [f"Matmul rate on this device: {rate_text(m['flops'])} ({m['n']}³, {m['dtype']}); MFU "
                  "(measured) = 6 N tokens/s over it.", ""]
    lines += ["| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in results["ratios"].items()]
    if results["targets"]:
        lines += ["", "| target (GPU) | value | met |", "|---|---|---|"]
        lines += [f"| {t['ratio']} {t['target']} | {t['value']:.2f} | {'yes' if t['met'] else 'no'} |"
                  for t in results["targets"]]
    return "\n".join(lines) + "\n"
