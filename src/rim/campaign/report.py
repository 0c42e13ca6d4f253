"""The campaign report: one ``rim compare`` table per task from a campaign folder (or the files it was packed into),
with TTFT and latency from the batch-1 timing done alone after training, RiM's per-block accuracy and the share of
CoT's gain that RiM recovers, (RiM - No-CoT) / (CoT - No-CoT).

    rim campaign --report OUT_DIR [--to DIR]      # OUT_DIR: what the device returned (results.tar.gz, campaign.json)
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path

from rim.compare import mean_se, read_run, write_report
from rim.rundir import BEST, RunDir, eval_name


def recovered_share(rows: dict[str, dict], rim: str = "rim", nocot: str = "nocot", cot: str = "cot"
                    ) -> float | None:
    """(RiM - No-CoT) / (CoT - No-CoT) of final-block accuracy; None when a row is missing or CoT gains nothing.

    >>> recovered_share({"rim": {"final_block_accuracy": 0.4}, "nocot": {"final_block_accuracy": 0.1},
    ...                  "cot": {"final_block_accuracy": 0.5}})
    0.75
    """
    if not all(k in rows for k in (rim, nocot, cot)):
        return None
    gain = rows[cot]["final_block_accuracy"] - rows[nocot]["final_block_accuracy"]
    if gain <= 0:
        return None
    return round((rows[rim]["final_block_accuracy"] - rows[nocot]["final_block_accuracy"]) / gain, 4)


def campaign_runs(root: Path) -> dict[str, dict[str, list[dict]]]:
    """task -> method -> scored runs (``rim.compare.read_run`` records), TTFT and latency from ``timing.json``
    and per-block accuracy added; runs without a test score are left out (listed in campaign.json)."""
    state = json.loads((root / "campaign.json").read_text(encoding="utf-8"))
    out: dict[str, dict[str, list[dict]]] = {}
    for job in state["jobs"].values():
        run_dir = root / job["run_dir"]
        try:
            record = read_run(run_dir)
        except FileNotFoundError:
            continue
        timing = run_dir / "timing.json"
        times = json.loads(timing.read_text(encoding="utf-8")) if timing.is_file() else {}
        record["ttft_ms"], record["latency_ms"] = times.get("ttft_ms"), times.get("latency_ms")
        results = RunDir(run_dir).read_results(eval_name(None, BEST)) or RunDir(run_dir).read_results(eval_name())
        record["block_accuracy"] = results.get("block_accuracy")
        out.setdefault(job["task"], {}).setdefault(job["method"], []).append(record)
    return out


def block_table(methods: dict[str, list[dict]]) -> str:
    """Per-block accuracy (%) of the methods with memory blocks, mean over seeds."""
    lines = []
    for method, runs in methods.items():
        curves = [r["block_accuracy"] for r in runs if r.get("block_accuracy")]
        if not curves:
            continue
        if not lines:
            head = ["method", *(f"block {k + 1}" for k in range(len(curves[0])))]
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        means = [mean_se([c[k] for c in curves])[0] for k in range(len(curves[0]))]
        lines.append("| " + " | ".join([method, *(f"{100 * m:.1f}" for m in means)]) + " |")
    return "\n".join(lines)


def write_campaign_report(root: str | Path, out_dir: str | Path) -> dict[str, list[dict]]:
    """``out_dir/<task>/compare.{md,csv,json,png}`` per task and ``out_dir/report.md`` with every table; returns
    the rows per task."""
    root, out_dir = Path(root), Path(out_dir)
    state = json.loads((root / "campaign.json").read_text(encoding="utf-8"))
    sections, all_rows = [], {}
    for task, methods in campaign_runs(root).items():
        rows = write_report(methods, out_dir / task)
        all_rows[task] = rows
        by_label = {r["label"]: r for r in rows}
        share = recovered_share(by_label)
        text = (out_dir / task / "compare.md").read_text(encoding="utf-8")
        blocks = block_table(methods)
        sections.append(f"## {task}\n\n{text}\n" + (f"Per-block accuracy (%, final-block readout after k blocks):\n\n"
                                                     f"{blocks}\n\n" if blocks else "")
                        + "Share of CoT's gain that RiM recovers, (RiM - No-CoT) / (CoT - No-CoT): "
                        + ("n/a (a row is missing, or CoT does not beat No-CoT)" if share is None
                           else f"{100 * share:.0f}%") + "\n")
    statuses = {label: job.get("status") for label, job in state["jobs"].items()}
    unfinished = sorted(label for label, s in statuses.items() if s != "done")
    plan = state.get("plan") or {}
    head = (f"# Campaign {Path(state['spec']).name}{' (smoke)' if state.get('smoke') else ''}\n\n"
            f"Environment: {json.dumps(state.get('environment'))}. Plan: concurrency {plan.get('concurrency')}, "
            f"steps per job {plan.get('steps')}. Jobs done {len(statuses) - len(unfinished)} of {len(statuses)}"
            + (f"; not finished: {', '.join(unfinished)}" if unfinished else "") + ".\n\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(head + "\n".join(sections), encoding="utf-8")
    return all_rows


def report_from_pack(pack_dir: str | Path, out_dir: str | Path) -> dict[str, list[dict]]:
    """The report from the files a campaign packed (``results.tar.gz`` and ``campaign.json``)."""
    pack_dir, out_dir = Path(pack_dir), Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(pack_dir / "results.tar.gz") as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / "campaign.json").write_bytes((pack_dir / "campaign.json").read_bytes())
        return write_campaign_report(tmp, out_dir)
