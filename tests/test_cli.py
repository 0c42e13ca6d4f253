"""End-to-end smoke runs through the real command line: `rim train`, `rim eval`, `rim show-layout`, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = """
model: {{name: {model}, train_mode: {mode}, lora_rank: 4, tiny_layers: 2, tiny_hidden: 32, tiny_heads: 2}}
data: {{task: running-sum, options: {{digits: 3, n_train: 64, n_test: 16, n_valid: 16}}}}
method: {{name: {method}, memory_tokens: 1, blocks: 3}}
stages: {stages}
train: {{batch_size: 8, progress: false, log_every: 1}}
eval: {{latency_examples: 2}}
output_dir: {out}
"""
RIM_STAGES = """
  - {name: grounding, kind: grounding, steps: 3, lr: 1e-3}
  - {name: refinement, kind: refinement, steps: 2, lr: 5e-4}"""


def rim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rim.cli", *args], capture_output=True, text=True, timeout=600)


def write_config(tmp_path: Path, method="rim", model="tiny", mode="auto", stages=RIM_STAGES) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(TINY.format(model=model, mode=mode, method=method, stages=stages, out=tmp_path / "run"))
    return path


@pytest.mark.slow
def test_train_eval_show_layout_through_cli(tmp_path):
    cfg = write_config(tmp_path)
    done = rim("train", str(cfg), "train.seed=1")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "layout.txt", "checkpoint/model.safetensors",
                 "checkpoint/tokenizer.json", "checkpoint/rim.json"):
        assert (run / name).is_file(), name
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    assert [e["stage"] for e in train_events] == ["grounding"] * 3 + ["refinement"] * 2
    assert all(e["loss"] > 0 for e in train_events) and events[-1]["event"] == "done"
    assert events[-1]["steps"] == 5 and events[-1]["train_s"] > 0
    assert "seed: 1" in (run / "config.yaml").read_text()
    assert "<b>" in (run / "layout.txt").read_text()

    done = rim("eval", str(run), "--max-eval", "8")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "eval/results.json").read_text())
    assert metrics["n"] == 8 and 0 <= metrics["final_block_accuracy"] <= 1
    assert 0 <= metrics["final_block_accuracy"] <= metrics["any_block_accuracy"] <= 1
    assert metrics["ttft_ms"] > 0 and metrics["latency_ms"] >= metrics["ttft_ms"]
    preds = [json.loads(line) for line in (run / "eval/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8
    assert {"question", "gold", "prediction", "block_readouts"} <= set(preds[0])
    assert len(preds[0]["block_readouts"]) == 3
    assert json.loads(done.stdout)["n"] == 8

    done = rim("eval", str(run), "--max-eval", "4", "--blocks", "5")  # K chosen at inference
    assert done.returncode == 0 and len(json.loads(done.stdout)["block_accuracy"]) == 5

    done = rim("show-layout", str(cfg))
    assert done.returncode == 0, done.stderr
    assert "== stage grounding" in done.stdout and "== stage refinement" in done.stdout
    assert "block 1" in done.stdout and "readout 1" in done.stdout and "#." in done.stdout


@pytest.mark.slow
def test_cli_errors_name_the_key(tmp_path):
    done = rim("train", str(write_config(tmp_path)), "train.batchsize=4")
    assert done.returncode == 2 and "'train.batchsize'" in done.stderr
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint/rim.json").write_text("{}")
    done = rim("train", str(write_config(tmp_path)))
    assert done.returncode == 2 and "already holds a run (checkpoint)" in done.stderr
    done = rim("eval", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "no finished checkpoint" in done.stderr
    for flag in ("--blocks", "--max-eval"):  # 0 once read as "not given": the default K or every problem
        done = rim("eval", str(run), flag, "0")
        assert done.returncode == 2 and f"argument {flag}: must be >= 1, not 0" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nocot", "cot"])
def test_baselines_train_and_eval(tmp_path, method):
    stages = "\n  - {name: sft, kind: sft, steps: 2, lr: 1e-3}"
    done = rim("train", str(write_config(tmp_path, method=method, stages=stages)))
    assert done.returncode == 0, done.stderr
    done = rim("eval", str(tmp_path / "run"), "--max-eval", "4")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["any_block_accuracy"] is None and metrics["generated_tokens"] >= 1


@pytest.mark.slow
def test_lora_run_on_a_local_pretrained_model(tmp_path):
    """A model directory on disk (as from the hub): LoRA + memory rows train, save as a peft adapter, reload."""
    from rim.data.tasks import RunningSum
    from rim.eval.run import load_run
    from rim.models.tiny import tiny_model, word_tokenizer

    tok = word_tokenizer(RunningSum().vocabulary())
    base = tiny_model(len(tok), "llama", layers=2, hidden=32, heads=2)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    done = rim("train", str(write_config(tmp_path, model=str(tmp_path / "base"), mode="lora")))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run/checkpoint/adapter_model.safetensors").is_file()
    cfg, model, tokenizer, method, task = load_run(tmp_path / "run", device="cpu")
    assert type(model).__name__ == "PeftModelForCausalLM"
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # the adapter carries trained weights
    memory_rows = model.get_input_embeddings()(torch.tensor(method.block[:3]))
    assert not torch.allclose(memory_rows[0], memory_rows[1])  # <b> and <m> rows moved apart from their mean init


@pytest.mark.slow
def test_demo_writes_results_json(tmp_path):
    tiny = ["model.tiny_layers=1", "model.tiny_hidden=16", "model.tiny_heads=2", "train.progress=false",
            "data.options={digits: 3, n_train: 64, n_test: 8, n_valid: 8}", "stages.0.steps=2",
            "eval.latency_examples=2", "train.batch_size=8"]
    done = rim("demo", "--out", str(tmp_path / "demo"), *tiny)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "demo/results.json").read_text())
    assert [r["method"] for r in rows] == ["nocot", "cot", "rim"]
    keys = {"method", "final_block_accuracy", "any_block_accuracy", "generated_tokens", "ttft_ms", "latency_ms", "n"}
    assert all(set(r) == keys and r["n"] == 8 for r in rows)
    assert rows[0]["any_block_accuracy"] is None and rows[2]["any_block_accuracy"] is not None
    assert rows[1]["generated_tokens"] > rows[0]["generated_tokens"]  # CoT generates its reasoning
    assert "| rim |" in done.stdout


@pytest.mark.slow
def test_demo_without_latency_and_a_stopped_run_name_what_happened(tmp_path):
    """eval.latency_examples=0 leaves the times out ("-"); a run that stops (a non-finite loss) ends the demo
    with its exit status and the method's name, not a traceback."""
    tiny = ["model.tiny_layers=1", "model.tiny_hidden=16", "model.tiny_heads=2", "train.progress=false",
            "data.options={digits: 3, n_train: 16, n_test: 4, n_valid: 4}", "stages.0.steps=1",
            "eval.latency_examples=0", "train.batch_size=8"]
    done = rim("demo", "--out", str(tmp_path / "demo"), "--methods", "nocot", *tiny)
    assert done.returncode == 0, done.stderr
    assert "| nocot |" in done.stdout and "| - | - |" in done.stdout
    done = rim("demo", "--out", str(tmp_path / "demo"), "--methods", "nocot,cot", *tiny, "stages.0.lr=1e30",
               "stages.0.steps=3")
    assert done.returncode == 3 and "demo method 'nocot': non-finite loss" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
