"""`rim compare`: spec merging and strict keys, the report's numbers from hand-written runs, one tiny end-to-end
compare that a second call collects without training again."""

from __future__ import annotations

import csv
import json
import shutil
import math
from pathlib import Path

import pytest

from rim.cli import main
from rim.compare import collect_runs, demo_spec_path, load_spec, method_configs, read_run, run_compare, write_report
from rim.config import ConfigError, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
base:
  model: {{name: tiny, tiny_layers: 2, tiny_hidden: 32, tiny_heads: 2}}
  data: {{task: running-sum, options: {{digits: 3, n_train: 64, n_test: 16, n_valid: 16}}}}
  train: {{batch_size: 8, progress: false, log_every: 1}}
  eval: {{latency_examples: 2}}
methods:
  nocot: {{method: {{name: nocot}}, stages: [{{name: sft, kind: sft, steps: 2, lr: 1.0e-3}}]}}
  rim-k2:
    method: {{name: rim, memory_tokens: 1, blocks: 2}}
    stages:
      - {{name: grounding, kind: grounding, steps: 2, lr: 1.0e-3}}
      - {{name: refinement, kind: refinement, steps: 1, lr: 5.0e-4}}
    train: {{batch_size: 4}}
seeds: {seeds}
ood: {ood}
output_dir: {out}
"""


def write_spec(tmp_path: Path, seeds: str = "[0]", ood: str = "[]", extra: str = "") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(seeds=seeds, ood=ood, out=tmp_path / "cmp") + extra)
    return path


def test_spec_merges_methods_over_base(tmp_path):
    spec = load_spec(write_spec(tmp_path, seeds="[0, 3]"))
    configs = method_configs(spec, ["eval.batch_size=16"])
    assert list(configs) == ["nocot", "rim-k2"]  # the label need not be the method name
    nocot, rim = configs["nocot"][1], configs["rim-k2"][0]
    assert nocot.train.seed == 3 and nocot.output_dir == str(tmp_path / "cmp/nocot-s3")
    assert rim.method.name == "rim" and rim.method.blocks == 2 and rim.method.memory_tokens == 1
    assert rim.train.batch_size == 4 and rim.train.log_every == 1 and nocot.train.batch_size == 8  # dicts merge
    assert [s.name for s in rim.stages] == ["grounding", "refinement"] and len(nocot.stages) == 1  # lists replace
    assert rim.model.tiny_hidden == 32 and rim.data.options["digits"] == 3 and rim.eval.batch_size == 16


@pytest.mark.parametrize("extra, overrides, match", [
    ("colour: red\n", [], "unknown compare spec key 'colour'"),
    ("", ["method.blockz=3"], "compare method 'nocot': unknown config key 'method.blockz'"),
    ("", ["train.seed=5"], "compare method 'nocot': config key 'train.seed' is set by the compare"),
])
def test_spec_errors_name_the_key(tmp_path, extra, overrides, match):
    with pytest.raises(ConfigError, match=match):
        method_configs(load_spec(write_spec(tmp_path, extra=extra)), overrides)


def test_method_errors_name_the_method(tmp_path):
    path = write_spec(tmp_path)
    good = path.read_text()
    path.write_text(good.replace("blocks: 2}", "blocks: 2, memory: 3}"))
    with pytest.raises(ConfigError, match="compare method 'rim-k2': unknown config key 'method.memory'"):
        method_configs(load_spec(path))
    path.write_text(good.replace("kind: grounding", "kind: sft"))
    with pytest.raises(ConfigError, match="compare method 'rim-k2'.*'stages.0.kind'"):
        method_configs(load_spec(path))
    with pytest.raises(ConfigError, match="'seeds'"):
        load_spec(write_spec(tmp_path, seeds="[]"))
    with pytest.raises(ConfigError, match=r"'seeds': \[0, 0, 1\] repeats a seed"):
        load_spec(write_spec(tmp_path, seeds="[0, 0, 1]"))


def fake_run(root: Path, name: str, method: str, seed: int, results: dict, events: list[dict],
             batch_size: int = 64, ood: dict | None = None) -> Path:
    """A run directory as `rim train` + `rim eval` leave it, with numbers chosen by hand."""
    run = root / name
    stages = "[{name: sft, kind: sft, steps: 900}]" if method != "rim" else "[{kind: grounding, steps: 900}]"
    cfg = load_config(None, [f"method.name={method}", f"stages={stages}", f"train.seed={seed}",
                             f"train.batch_size={batch_size}", "data.options={n_test: 300}"])
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    base = {"task": "running-sum", "split": "test", "n": 300, "device": "cpu", "checkpoint": "checkpoint",
            "eval_blocks": cfg.method.blocks, "max_eval": None}
    for out_name, metrics in {"eval": results, **{f"eval-{t}": {"final_block_accuracy": a, "task": t}
                                                  for t, a in (ood or {}).items()}}.items():
        (run / out_name).mkdir()
        (run / out_name / "results.json").write_text(json.dumps({**base, **metrics}))
    return run


def results(final: float, anyb: float | None, tokens: float, ttft: float, latency: float) -> dict:
    return {"final_block_accuracy": final, "any_block_accuracy": anyb, "generated_tokens": tokens, "ttft_ms": ttft,
            "latency_ms": latency}


def train_events(*stages: tuple[str, float]) -> list[dict]:
    """Older runs: per stage two `train` lines, the done event without train_s."""
    lines = [{"event": "setup"}]
    for stage, elapsed in stages:
        lines += [{"event": "train", "stage": stage, "step": 1, "elapsed_s": elapsed / 2},
                  {"event": "train", "stage": stage, "step": 2, "elapsed_s": elapsed}]
    return [*lines, {"event": "done", "steps": 900}]


@pytest.mark.slow
def test_report_numbers_are_the_runs_numbers(tmp_path):
    done = [{"event": "done", "steps": 900, "train_s": 30.0}, {"event": "done", "steps": 900, "train_s": 34.0}]
    nocot = [fake_run(tmp_path, f"nocot-s{s}", "nocot", s, results(f, None, 2.0, t, t + 5), [d])
             for s, f, t, d in [(0, 0.10, 5.0, done[0]), (1, 0.20, 7.0, done[1])]]
    rim = [fake_run(tmp_path, f"rim-s{s}", "rim", s, results(f, a, 2.0, t, t + 6), train_events(("g", g), ("r", r)),
                    batch_size=32, ood={"svamp": o})
           for s, f, a, t, g, r, o in [(0, 0.90, 0.95, 8.0, 20.0, 5.0, 0.5), (1, 0.96, 1.0, 10.0, 22.0, 6.0, 0.7)]]
    out = tmp_path / "report"
    rows = write_report({"nocot": [read_run(r) for r in nocot], "rim": [read_run(r) for r in rim]}, out)

    se = lambda a, b: abs(a - b) / 2  # noqa: E731  (sample std / sqrt(2) of two values)
    expect = {"nocot": {"final_block_accuracy": (0.15, se(0.1, 0.2)), "any_block_accuracy": (None, None),
                        "ttft_ms": (6.0, 1.0), "latency_ms": (11.0, 1.0), "train_s": (32.0, 2.0),
                        "generated_tokens": (2.0, 0.0)},
              "rim": {"final_block_accuracy": (0.93, se(0.9, 0.96)), "any_block_accuracy": (0.975, 0.025),
                      "ood_svamp_accuracy": (0.6, 0.1), "ttft_ms": (9.0, 1.0), "latency_ms": (15.0, 1.0),
                      "train_s": (26.5, 1.5), "generated_tokens": (2.0, 0.0)}}
    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    saved = json.loads((out / "compare.json").read_text())["rows"]
    for row, line, kept in zip(rows, table, saved):
        assert row == kept and line["label"] == row["label"] and line["seeds"] == "0 1"
        for key, (mean, err) in expect[row["label"]].items():
            assert row[key] == pytest.approx(mean) and row[f"{key}_se"] == pytest.approx(err)
            assert line[key] == ("" if mean is None else repr(row[key]))  # full precision
    assert rows[0]["budget_examples"] == 900 * 64 and rows[1]["budget_examples"] == 900 * 32

    md = (out / "compare.md").read_text()
    assert "| svamp acc. % |" in md
    assert "| nocot | 15.0 ± 5.0 | - | - | 2.0 ± 0.0 | 6.00 ± 1.00 | 11.00 ± 1.00 | 32.0 ± 2.0 | 900 x 64 |" in md
    assert "| rim | 93.0 ± 3.0 | 97.5 ± 2.5 | 60.0 ± 10.0 |" in md
    assert "seeds 0, 1 (mean ± SE over seeds)" in md
    assert "budgets DIFFER (optimizer steps x batch): nocot 900 x 64, rim 900 x 32" in md
    assert "running-sum, test split, n = 300" in md and "device cpu" in md
    from test_plots_analyze import is_png

    assert is_png(out / "compare.png")  # decoded: a plot, not a blank image

    assert main(["compare", "--collect", str(nocot[0]), str(rim[1]), "--out", str(tmp_path / "collected")]) == 0
    rows = json.loads((tmp_path / "collected/compare.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["nocot-s0", "rim-s1"]
    assert rows[1]["ood_svamp_accuracy"] == 0.7 and rows[1]["final_block_accuracy_se"] is None
    assert rows[1]["train_s"] == pytest.approx(28.0)
    md = (tmp_path / "collected/compare.md").read_text()
    assert "| rim-s1 | 96.0 | 100.0 | 70.0 |" in md and "seeds 0, 1 (one run per method)" in md


def test_collect_needs_scored_runs(tmp_path):
    run = fake_run(tmp_path, "a", "nocot", 0, results(0.1, None, 2.0, 1.0, 2.0), [{"event": "done", "steps": 1}])
    (run / "eval/results.json").unlink()
    with pytest.raises(FileNotFoundError, match="not scored yet"):
        collect_runs([run], tmp_path / "out")


@pytest.mark.slow
def test_compare_end_to_end_then_collects_without_training(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, ood="[running-sum]")  # OOD: 4 digits where training saw 3
    rows = run_compare(spec)
    assert [r["label"] for r in rows] == ["nocot", "rim-k2"]
    nocot, rim = rows
    assert nocot["steps"] == 2 and rim["steps"] == 3 and rim["budget_examples"] == 3 * 4
    assert nocot["any_block_accuracy"] is None and 0 <= rim["final_block_accuracy"] <= rim["any_block_accuracy"]
    assert nocot["n"] == 16 and nocot["train_s"] > 0 and rim["ttft_ms"] > 0
    run = tmp_path / "cmp/rim-k2-s0"
    ood = json.loads((run / "eval-running-sum/results.json").read_text())
    assert ood["n"] == 300 and rim["ood_running-sum_accuracy"] == ood["final_block_accuracy"]
    for name in ("compare.md", "compare.csv", "compare.json", "compare.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0

    before = (run / "metrics.jsonl").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished, scored run was trained or scored again")

    monkeypatch.setattr("rim.train.loop.train", refuse)
    monkeypatch.setattr("rim.eval.run.eval_run", refuse)
    assert run_compare(spec) == rows
    assert (run / "metrics.jsonl").read_bytes() == before
    with pytest.raises(ConfigError, match=r"another config \(config key 'stages.0.lr'"):
        run_compare(spec, ["stages.0.lr=2e-3"])
    assert math.isfinite(rows[1]["latency_ms"])
    # an exploratory `rim eval RUN --task multiplication --max-eval 10` is not one of the run's OOD scores
    (run / "eval-multiplication").mkdir()
    (run / "eval-multiplication/results.json").write_text(json.dumps(
        {**json.loads((run / "eval/results.json").read_text()), "task": "multiplication", "max_eval": 10}))
    assert not any(k.startswith("ood_multiplication") for k in collect_runs([run], tmp_path / "out")[0])
    # `rim eval RUN --split valid --max-eval 3` writes into the same folder: never averaged in, scored again
    stale = json.loads((run / "eval/results.json").read_text())
    (run / "eval/results.json").write_text(json.dumps({**stale, "split": "valid", "max_eval": 3, "n": 3}))
    with pytest.raises(ConfigError, match="scored with split 'valid', the run's is 'test'"):
        collect_runs([run], tmp_path / "out")
    monkeypatch.undo()
    again = run_compare(spec)[1]
    assert (again["split"], again["n"], again["final_block_accuracy"]) == ("test", 16, rim["final_block_accuracy"])
    assert (run / "metrics.jsonl").read_bytes() == before  # not trained again


@pytest.mark.slow
def test_a_run_that_diverges_names_itself_and_what_to_change(tmp_path):
    from rim.errors import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match=r"compare run .*-s0: non-finite loss in stage .*; change the spec"):
        run_compare(write_spec(tmp_path), ["stages.0.lr=1e30"])



@pytest.mark.slow
def test_an_interrupted_compare_run_continues_from_its_checkpoint(tmp_path, monkeypatch):
    """A compare stopped inside a run (a crash after step 1 of nocot's 2) continues that run from its step
    checkpoint when run again, instead of training it from the start; a changed spec starts it afresh."""
    from rim.train.checkpoint import Checkpointer

    spec = write_spec(tmp_path)
    original = Checkpointer.on_step

    def on_step(self, model, pos, *args, **kwargs):
        original(self, model, pos, *args, **kwargs)
        if pos.step == 1:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "on_step", on_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_compare(spec, ["train.save_every=1"])
    run = tmp_path / "cmp/nocot-s0"
    assert (run / "checkpoints/step-1").is_dir() and not (run / "checkpoint").exists()
    rows = run_compare(spec, ["train.save_every=1"])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [1] and rows[0]["steps"] == 2
    shutil.rmtree(run / "checkpoint")  # unfinished again, and the spec changes: a new run, no resume
    shutil.rmtree(tmp_path / "cmp/rim-k2-s0")  # (a finished run of another config is refused instead)
    run_compare(spec, ["train.save_every=1", "train.max_grad_norm=0.5"])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(e["event"] == "resume" for e in events)


def test_demo_trains_the_packaged_specs_entries_afresh(tmp_path, monkeypatch):
    """`rim demo` has no configs of its own: each method is the compare spec's entry at the demo's seed, trained
    into <out>/<method> through compare's machinery (retrained every time), and its row is that run's results."""
    import rim.demo
    from rim.rundir import RunDir

    calls = []

    def prepare(cfg, ood, retrain=False, advise=True):
        calls.append((cfg, ood, retrain, advise))
        RunDir(cfg.output_dir).write_results("eval", {"method": cfg.method.name, "final_block_accuracy": 0.5,
                                                      "any_block_accuracy": None, "generated_tokens": 2.0,
                                                      "ttft_ms": 1.0, "latency_ms": 2.0, "n": 300, "extra": 1})

    monkeypatch.setattr(rim.demo, "prepare_run", prepare)
    rows = rim.demo.run_demo(tmp_path / "demo", seed=3, methods=("rim", "nocot"), overrides=["train.progress=false"])
    spec = method_configs(load_spec(demo_spec_path()), ["train.progress=false"])
    assert [cfg.method.name for cfg, *_ in calls] == ["rim", "nocot"]
    for cfg, ood, retrain, advise in calls:
        want = to_dict(spec[cfg.method.name][0])
        assert to_dict(cfg) == {**want, "train": {**want["train"], "seed": 3},
                                "output_dir": str(tmp_path / "demo" / cfg.method.name)}
        assert (ood, retrain, advise) == ([], True, False)
    assert [r["method"] for r in rows] == ["rim", "nocot"] and "extra" not in rows[0]
    assert json.loads((tmp_path / "demo/results.json").read_text()) == rows
    with pytest.raises(FileNotFoundError, match="no demo config for method 'quiet-star'"):
        rim.demo.run_demo(tmp_path / "demo", methods=("quiet-star",))
