"""RiM + rl against RiM + the same number of extra refinement steps, on CPU (issue 19's comparison).

    python bench/rl_cpu.py --out runs/rl-cpu --seeds 0 1 2 --variants demo hard --extra 100 --jobs 2

For every variant (demo: the `rim demo` task, running sums of 4 digits; hard: 6 digits, same model and recipe) and
seed: the demo's RiM (configs/cpu/rl/base.yaml) is trained once, then continued from its final weights
(``model.init_from``) by two arms of ``--extra`` optimizer steps each: ``refine`` (one more refinement stage, the
base's own settings) and ``rl`` (an rl stage: ``--prompts`` prompts x ``--group`` samples per step, learning rate
``--rl-lr``; ``refine`` at ``--refine-lr``). The base and both arms are scored on the valid and the test split
(final- and any-block accuracy, per-block accuracy); ``--select`` instead runs the arms of seed 0 once for each
``--rl-lr`` and ``--refine-lr`` given, scored on the valid split only, to choose each arm's learning rate without
looking at the test split.

Every job writes ``<run>/scores.json`` when it finishes (a stopped script keeps what finished and skips it when
started again); the report (``report.md``, ``report.json``, ``report.png``) is rewritten from every finished job's
``scores.json`` after each job (``--report``: only that). Jobs run as ``--jobs``
concurrent processes with one thread each, so their training times share the cores: compare the arms' cost with
``--time-steps`` (``timing.json``), which runs them one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "cpu" / "rl" / "base.yaml"
VARIANTS = {"demo": [], "hard": ["data.options.digits=6"]}


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def train_and_score(run_dir: Path, overrides: list[str], splits: tuple[str, ...]) -> dict:
    """Train ``run_dir`` (unless scored already), score it on ``splits``, write and return ``scores.json``."""
    done = run_dir / "scores.json"
    if done.exists():
        return json.loads(done.read_text())
    log = run_dir.parent / f"{run_dir.name}.log"
    metrics = run_dir / "metrics.jsonl"
    train_s = None
    if not (metrics.exists() and '"event": "done"' in metrics.read_text()):  # a finished run is only scored
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        start = time.perf_counter()
        run(["rim", "train", str(BASE), *overrides, f"output_dir={run_dir}"], log)
        train_s = time.perf_counter() - start
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    finished = [e for e in events if e["event"] == "done"][-1]
    stages = {}
    for e in events:
        if e["event"] == "train":
            s = stages.setdefault(e["stage"], {"tokens": 0, "steps": 0})
            s["tokens"], s["steps"], s["elapsed_s"] = e["tokens"], e["stage_step"], e["elapsed_s"]
            if "reward" in e:
                s.setdefault("reward", []).append((e["stage_step"], e["reward"]))
    scores = {"run": str(run_dir), "overrides": overrides, "wall_s": train_s, "train_s": finished["train_s"],
              "stages": stages}
    for split in splits:
        run(["rim", "eval", str(run_dir), "--split", split, "--device", "cpu"], log)
        metrics = json.loads((run_dir / "eval" / "results.json").read_text())
        scores[split] = {k: metrics.get(k) for k in ("final_block_accuracy", "any_block_accuracy", "block_accuracy",
                                                      "n", "ttft_ms", "latency_ms")}
    done.write_text(json.dumps(scores, indent=1), encoding="utf-8")
    return scores


def arm_overrides(arm: str, base_dir: Path, args) -> list[str]:
    common = [f"model.init_from={base_dir}"]
    if arm == "refine":
        return [*common, f"stages=[{{name: refinement, kind: refinement, steps: {args.extra}, "
                         f"lr: {args.refine_lr[0]}, warmup: 0.04, block_weight: linear}}]"]
    return [*common, f"train.batch_size={args.prompts}",
            f"stages=[{{name: rl, kind: rl, steps: {args.extra}, lr: {args.rl_lr[0]}, warmup: 0.04, "
            f"group_size: {args.group}, kl_weight: {args.kl}, temperature: {args.temperature}}}]"]


def mean_se(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values) / len(values) ** 0.5:.1f}"


def collect(out: Path) -> dict:
    """Every finished job's scores under ``out`` (``<variant>/<arm>-s<seed>/scores.json``), by ``variant/run``."""
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
            for p in sorted(out.glob("*/*/scores.json"))}


def report(out: Path, results: dict) -> None:
    """``report.json`` (every job's scores) and ``report.md`` (mean ± SE over seeds per variant and arm)."""
    (out / "report.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = ["| variant | arm | seeds | valid final | test final | test any-block | test per-block (mean) |",
             "|---|---|---|---|---|---|---|"]
    arms = sorted({key.split("/")[1].rsplit("-s", 1)[0] for key in results}, key=lambda a: (a != "base", a))
    for variant in VARIANTS:
        for arm in arms:
            rows = [r for key, r in sorted(results.items()) if key.rsplit("-s", 1)[0] == f"{variant}/{arm}"]
            if not rows:
                continue
            test = [r["test"] for r in rows if "test" in r]
            valid = [r["valid"]["final_block_accuracy"] for r in rows if "valid" in r]
            blocks = [statistics.mean(b) for b in zip(*(t["block_accuracy"] for t in test))] if test else []
            lines.append(f"| {variant} | {arm} | {len(rows)} | {mean_se(valid)} | "
                         f"{mean_se([t['final_block_accuracy'] for t in test])} | "
                         f"{mean_se([t['any_block_accuracy'] for t in test])} | "
                         f"{' '.join(f'{100 * b:.0f}' for b in blocks)} |")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(out, results, arms)


def plot(out: Path, results: dict, arms: list[str]) -> None:
    """``report.png``: test accuracy of the readout after each block k, mean over seeds, per variant and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if any(key.startswith(v + "/") and "test" in r for key, r in results.items())]
    if not variants:
        return
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.6), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for arm in arms:
            curves = [r["test"]["block_accuracy"] for key, r in results.items()
                      if key.rsplit("-s", 1)[0] == f"{variant}/{arm}" and "test" in r]
            if curves:
                mean = [100 * statistics.mean(b) for b in zip(*curves)]
                ax.plot(range(1, len(mean) + 1), mean, marker="o", label=f"{arm} ({len(curves)} seeds)")
        ax.set(title=f"{variant}: accuracy of the readout after block k (test)", xlabel="block k",
               ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


def time_arms(out: Path, args) -> dict:
    """Seconds per optimizer step of each arm, ``--time-steps`` steps from each variant's seed-0 base, one run at a
    time (compare the two side by side: run nothing else meanwhile); written to ``timing.json``."""
    rows = {}
    for variant in args.variants:
        base_dir = out / variant / "base-s0"
        for arm in ("refine", "rl"):
            run_dir = out / "timing" / f"{variant}-{arm}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            overrides = [*VARIANTS[variant], *arm_overrides(arm, base_dir, args),
                         f"stages.0.steps={args.time_steps}", "eval.latency_examples=0"]
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = run_dir.parent / f"{run_dir.name}.log"
            run(["rim", "train", str(BASE), *overrides, f"output_dir={run_dir}"], log)
            events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            trained = [e for e in events if e["event"] == "train"][-1]
            done = [e for e in events if e["event"] == "done"][-1]
            rows[f"{variant}/{arm}"] = {"steps": done["steps"], "s_per_step": done["train_s"] / done["steps"],
                                        "tokens_per_step": trained["tokens"] / done["steps"]}
    (out / "timing.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/rl-cpu"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--extra", type=int, default=100, help="optimizer steps of each arm")
    parser.add_argument("--prompts", type=int, default=16, help="rl: prompts per step (train.batch_size)")
    parser.add_argument("--group", type=int, default=8, help="rl: samples per prompt")
    parser.add_argument("--kl", type=float, default=0.04)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rl-lr", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--refine-lr", type=float, nargs="+", default=[5e-4])
    parser.add_argument("--arms", nargs="+", choices=["refine", "rl"], default=["refine", "rl"])
    parser.add_argument("--select", action="store_true",
                        help="only the arms of seed 0, one per --rl-lr and --refine-lr, scored on valid")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny settings: a test of this script")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from what finished")
    parser.add_argument("--time-steps", type=int, default=0,
                        help="only time N steps of each arm from the seed-0 bases, one run at a time")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = (["stages.grounding.steps=4", "stages.refinement.steps=2", "data.options.n_train=64",
              "data.options.n_test=8", "data.options.n_valid=8", "model.tiny_layers=2", "model.tiny_hidden=32",
              "model.tiny_heads=2", "eval.latency_examples=1"] if args.smoke else [])
    if args.time_steps:
        print(json.dumps(time_arms(out, args), indent=1))
        return
    if args.report:
        report(out, collect(out))
        print((out / "report.md").read_text())
        return

    lock = threading.Lock()

    def job(key: str, run_dir: Path, overrides: list[str], splits: tuple[str, ...]) -> None:
        scores = train_and_score(run_dir, overrides, splits)
        with lock:  # from the files: other instances of this script may write into ``out`` too
            report(out, collect(out))
        print(f"{key}: " + ", ".join(f"{s} {scores[s]['final_block_accuracy']:.3f}" for s in splits), flush=True)

    splits = ("valid",) if args.select else ("valid", "test")

    def seed_chain(variant: str, seed: int) -> None:
        base_dir = out / variant / f"base-s{seed}"
        base = [*VARIANTS[variant], *extra, f"train.seed={seed}"]
        job(f"{variant}/base-s{seed}", base_dir, base, splits)
        if args.select:
            for arm in ("refine", "rl"):
                for lr in vars(args)[f"{arm}_lr"]:
                    args_lr = argparse.Namespace(**{**vars(args), f"{arm}_lr": [lr]})
                    job(f"{variant}/{arm}-lr{lr:g}-s{seed}", out / variant / f"{arm}-lr{lr:g}-s{seed}",
                        [*base, *arm_overrides(arm, base_dir, args_lr)], splits)
            return
        for arm in args.arms:
            job(f"{variant}/{arm}-s{seed}", out / variant / f"{arm}-s{seed}",
                [*base, *arm_overrides(arm, base_dir, args)], splits)

    chains = [(v, s) for s in (args.seeds[:1] if args.select else args.seeds) for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(seed_chain, v, s) for v, s in chains]:
            f.result()
    print((out / "report.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
