"""lm-evaluation-harness: rim's model plugin and task YAMLs give `rim eval`'s predictions and correctness on the
same problems, problem by problem; the shipped tasks load; rim's scoring rule is the metric."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

if importlib.util.find_spec("lm_eval") is None:
    pytest.skip("lm-eval not installed (pip install -e '.[lmeval]')", allow_module_level=True)

from rim.cli import main  # noqa: E402
from rim.compare import build_config, demo_spec_path, load_spec, method_configs  # noqa: E402
from rim.integrations.lmeval import TASKS_DIR, rim_results  # noqa: E402

DATA = Path(os.environ.get("RIM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
N = 24  # demo test problems scored both ways


def demo_run(out: Path, stages: str) -> Path:
    """A RiM run on the demo task's data (the options rim_demo.yaml names), tiny model, a few steps."""
    from rim.train.loop import train

    return train(build_config(load_spec(demo_spec_path()).methods["rim"], [
        "model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", "method.blocks=3", "data.max_train=512",
        f"stages={stages}", "train.batch_size=32", "train.progress=false", "eval.latency_examples=1",
        f"output_dir={out}"]))


def lm_eval_samples(capsys, export: Path, out: Path, *extra: str) -> tuple[dict, list[dict]]:
    """``rim lm-eval EXPORT --tasks rim_demo ...`` in this process: lm-eval's results and per-problem samples."""
    code = main(["lm-eval", str(export), "--tasks", "rim_demo", "--limit", str(N), "--batch_size", "5", "--device",
                 "cpu", "--log_samples", "--output_path", str(out), *extra])
    capsys.readouterr()
    assert code == 0
    (results,) = out.glob("*/results_*.json")
    (samples,) = out.glob("*/samples_rim_demo_*.jsonl")
    return (json.loads(results.read_text())["results"]["rim_demo"],
            [json.loads(line) for line in samples.read_text().splitlines()])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["trained", "untrained"])
def test_lm_eval_scores_the_demo_task_problem_by_problem_as_rim_eval(kind, tmp_path, capsys):
    """`trained` (50 steps: answers one digit, some right) and `untrained` (lr ~ 0: varied multi-token and empty
    outputs, none right) runs, at the trained K = 3 and at K = 2: the same questions in the same order, the same
    generated text, prediction and correctness as `rim eval`, and so the same accuracy."""
    from rim.eval.run import eval_run
    from rim.serve import export_run

    lr, steps = {"trained": ("3e-3", (40, 10)), "untrained": ("1e-4", (2, 2))}[kind]
    run = demo_run(tmp_path / "run", f"[{{name: g, kind: grounding, steps: {steps[0]}, lr: {lr}}}, "
                                     f"{{name: r, kind: refinement, steps: {steps[1]}, lr: {lr}}}]")
    export = export_run(run, tmp_path / "export")
    scored = []
    for k in (3, 2):
        records = eval_run(run, blocks=k, max_eval=N, device="cpu", full=False).records
        results, samples = lm_eval_samples(capsys, export, tmp_path / f"lm-eval-{k}", "--model_args", f"blocks={k}")
        samples.sort(key=lambda s: s["doc_id"])
        assert [s["doc"]["question"] for s in samples] == [r["question"] for r in records]
        assert [s["resps"][0][0] for s in samples] == [r["output"] for r in records]
        assert [s["exact_match"] for s in samples] == [float(r["correct"]) for r in records]
        assert results["exact_match,none"] == pytest.approx(sum(r["correct"] for r in records) / N)
        scored += records
    outputs = [r["output"] for r in scored]
    if kind == "trained":
        assert 0 < sum(r["correct"] for r in scored) < len(scored)  # both kinds of problem are compared
    else:
        assert len(set(outputs)) > 1 and any(len(o.split()) > 1 for o in outputs)


def test_demo_task_yaml_names_the_demo_configs_data():
    """rim_demo.yaml scores the problems `rim demo` trains and evaluates on: the same task and options."""
    spec = yaml.safe_load((TASKS_DIR / "rim_demo.yaml").read_text())["dataset_kwargs"]
    configs = method_configs(load_spec(demo_spec_path()))
    assert "rim" in configs and len(configs) > 3
    for label, (cfg, *_) in configs.items():
        data = cfg.data
        assert (data.task, data.options, data.eval_split) == (spec["rim_task"], spec["rim_options"],
                                                              spec["rim_split"]), label


@pytest.mark.slow  # reads every task's full data files (about 18 s)
def test_every_shipped_task_loads_rims_problems(monkeypatch):
    """Each YAML gives its rim task's split in rim's order, with the question alone as the prompt."""
    from lm_eval.tasks import TaskManager

    from rim.data.tasks import make_task

    if not DATA.is_dir():
        pytest.skip(f"benchmark data not found at {DATA}")
    monkeypatch.setenv("RIM_DATA_DIR", str(DATA))
    names = sorted(p.stem for p in TASKS_DIR.glob("rim_*.yaml"))
    assert names == ["rim_demo", "rim_gsm8k", "rim_gsm_hard", "rim_multiarith", "rim_multiplication",
                     "rim_multiplication_5x5", "rim_prontoqa", "rim_prosqa", "rim_svamp"]
    tasks = TaskManager(include_path=str(TASKS_DIR), metadata={}).load(names)["tasks"]
    for name in names:
        spec = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())["dataset_kwargs"]
        expected = make_task(spec["rim_task"], spec["rim_options"]).load(spec["rim_split"])
        docs = list(tasks[name].test_docs())
        assert [(d["question"], d["answer"]) for d in docs] == [(e.question, e.answer) for e in expected], name
        assert tasks[name].doc_to_text(docs[0]) == docs[0]["question"]


def test_scoring_is_rims_extraction_and_correctness():
    """Numbers compare as numbers on GSM8K; a CoT-style model's answer is read after its last ####."""
    doc = {"rim_task": "gsm8k", "rim_options": "{}", "answer": "1000", "rim_cot": False}
    assert rim_results(doc, [" 1,000.0"]) == {"exact_match": 1.0}
    assert rim_results(doc, [" 999"]) == {"exact_match": 0.0}
    cot = dict(doc, rim_cot=True)
    assert rim_results(cot, ["<<2*500=1000>> #### 1000"]) == {"exact_match": 1.0}
    assert rim_results(cot, ["1000"]) == {"exact_match": 0.0}  # no ####: no answer, as in rim eval
    assert rim_results(doc, ["<<2*500=1000>> #### 1000"]) == {"exact_match": 0.0}


def test_bad_model_args_are_clear_errors(tmp_path):
    from rim.config import ConfigError
    from rim.integrations.lmeval import RimLM

    with pytest.raises(ConfigError, match="rim.json: not found"):
        RimLM(pretrained=str(tmp_path))
    (tmp_path / "rim.json").write_text(json.dumps({"method": "cot", "prompt_format": "plain",
                                                   "prompt_suffix_ids": [], "blocks": None}))
    with pytest.raises(ConfigError, match="has no memory blocks"):
        RimLM(pretrained=str(tmp_path), blocks=2)
    with pytest.raises(ConfigError, match="unknown argument 'temperature'"):
        RimLM(pretrained=str(tmp_path), temperature=0.5)
