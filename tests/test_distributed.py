"""Scale-out through torch.distributed: two CPU processes (gloo, launched by torchrun) train exactly like one
process at the same global batch (batch_size x grad_accum), with data parallelism or fully sharded (FSDP2), and
only the main process writes; a sharded run resumes exactly, from a sharded or a data-parallel checkpoint; SIGTERM
to one process stops every process at the same step with a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rim.models.tiny import tiny_model, word_tokenizer
from rim.rundir import RunDir

pytestmark = pytest.mark.slow  # every test here trains a model

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")

CONFIG = """
model: {name: tiny, tiny_layers: 2, tiny_hidden: 32, tiny_heads: 2}
data: {task: running-sum, options: {n_train: 32, n_test: 8, n_valid: 8}}
method: {name: rim, memory_tokens: 1, blocks: 2}
stages:
  - {name: grounding, kind: grounding, epochs: 2, lr: 3.0e-3}  # 32 / (8 x 2) = 2 optimizer steps an epoch
  - {name: refinement, kind: refinement, steps: 2, lr: 1.0e-3}
train: {batch_size: 8, grad_accum: 2, log_every: 1, progress: false, device: cpu, save_every: 3}
"""


def run(cmd: list[str], tmp_path) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if "Writing" not in line and "Loading" not in line]
    assert done.returncode == 0, "\n".join(errors)[-4000:]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def losses(run_dir) -> dict[int, float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


def one_and_two_processes_agree(tmp_path, *two_overrides: str) -> None:
    """Train ``c.yaml`` in one process (``one/``) and in two under torchrun (``two/``, with ``two_overrides``): the
    same losses at every step and the same final weights."""
    run([sys.executable, "-m", "rim.cli", "train", "c.yaml", "output_dir=one"], tmp_path)
    run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "rim.cli", "train", "c.yaml", "output_dir=two",
         *two_overrides], tmp_path)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), f"step {step}"
    assert_same_weights(tmp_path / "one", tmp_path / "two", "checkpoint")


@needs_torchrun
def test_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG)
    torchrun = TORCHRUN
    one_and_two_processes_agree(tmp_path)
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "setup"' in line for line in lines) == 1  # one writer
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-3", "step-4", "step-6"]

    # evaluation sharded over two processes and gathered: the same predictions as one process
    run([sys.executable, "-m", "rim.cli", "eval", "one", "--max-eval", "7"], tmp_path)
    single = (tmp_path / "one" / "eval" / "predictions.jsonl").read_text()
    run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "rim.cli", "eval", "one", "--max-eval", "7"],
        tmp_path)
    sharded = (tmp_path / "one" / "eval" / "predictions.jsonl").read_text()
    assert sharded == single and len(sharded.splitlines()) == 7

    # a data-parallel checkpoint (optimizer state keyed by parameter index) resumes sharded (keyed by name)
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "rim.cli", "train", "c.yaml", "output_dir=resumed",
         "train.fsdp=true", "--resume", "resumed/checkpoints/step-3"], tmp_path)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    assert_same_weights(tmp_path / "two", tmp_path / "resumed", "checkpoint")


def weight_file(run_dir, sub: str) -> dict[str, torch.Tensor]:
    files = list((run_dir / sub).glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def assert_same_weights(a, b, sub: str) -> None:
    wa, wb = weight_file(a, sub), weight_file(b, sub)
    assert wa.keys() == wb.keys(), sub
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), f"{sub}: {k}"


@needs_torchrun
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_two_processes_equal_one_and_resume_exactly(tmp_path, mode):
    """Sharded weights, gradients and optimizer state: the same losses, selection and saved weights as one
    process; a checkpoint holds full (gathered) weights and optimizer state, and resuming from it under FSDP
    gives the uninterrupted run. LoRA on a model with tied embeddings (peft saves the head's copy of the token
    rows too), with gradient accumulation inside each process. The full-training case also fuses the loss with the
    LM head (``train.fused_loss``)."""
    (tmp_path / "c.yaml").write_text(CONFIG + "eval: {select_split: valid, every: 2}\n")
    extra, sharded = [], ["train.fsdp=true"]
    if mode == "full":  # and the loss fused with the LM head, inside the sharded root's forward
        sharded.append("train.fused_loss=true")
    if mode == "lora":
        tok = word_tokenizer([str(d) for d in range(10)] + ["+", "=", "####", "?"])
        base = tiny_model(len(tok), "llama", layers=2, hidden=32, heads=2)
        assert base.config.tie_word_embeddings
        base.save_pretrained(tmp_path / "base")
        tok.save_pretrained(tmp_path / "base")
        # and two micro-batches per process and step (the same global batch 16): FSDP's gradient sync is switched
        # off for the first
        extra = ["model.name=base", "model.train_mode=lora", "model.lora_rank=4", "train.batch_size=4",
                 "train.grad_accum=4"]
    fsdp = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "rim.cli", "train", "c.yaml", *sharded, *extra]
    run([sys.executable, "-m", "rim.cli", "train", "c.yaml", "output_dir=one", *extra], tmp_path)
    run([*fsdp, "output_dir=two"], tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    setup = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["event"] == "setup" and setup["processes"] == 2 and setup["sharded"]
    assert losses(one).keys() == losses(two).keys() == set(range(1, 7))
    for step, loss in losses(one).items():
        assert losses(two)[step] == pytest.approx(loss, abs=1e-5), f"step {step}"
    selections = [[(e["step"], e["accuracy"]) for e in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                   if e["event"] == "select"] for d in (one, two)]
    assert selections[0] == selections[1] and len(selections[0]) == 3
    for sub in ("checkpoint", "best", "checkpoints/step-3"):
        assert_same_weights(one, two, sub)

    shutil.copytree(two, tmp_path / "resumed")
    run([*fsdp, "output_dir=resumed", "--resume", "resumed/checkpoints/step-3"], tmp_path)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(two), abs=1e-6)
    assert_same_weights(two, tmp_path / "resumed", "checkpoint")


@needs_torchrun
def test_sigterm_to_one_process_stops_all_at_one_checkpoint(tmp_path):
    """A pre-empted worker: SIGTERM reaches rank 1 only. Both processes agree to stop at the same step, the main
    process writes that step's checkpoint, and the run resumes from it to the end with every step logged once."""
    (tmp_path / "c.yaml").write_text(CONFIG.replace("epochs: 2", "steps: 200").replace("save_every: 3",
                                                                                          "save_every: 1000"))
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "rim.cli", "train", "c.yaml", "output_dir=run"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and '"event": "train"' in metrics.read_text()):
        time.sleep(0.2)
    workers = (Path("/proc") / str(proc.pid) / "task" / str(proc.pid) / "children").read_text().split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "exitcode  : 143" in err  # rank 1 stopped through rim's handler, not killed
    saved = RunDir(tmp_path / "run").latest_valid()
    assert saved is not None and 0 < int(saved.name[5:]) < 202
    assert max(losses(tmp_path / "run")) == int(saved.name[5:])  # nothing trained after the checkpoint
    run([*cmd, "--resume", "auto"], tmp_path)
    assert sorted(losses(tmp_path / "run")) == list(range(1, 203))


@needs_torchrun
def test_coconut_two_processes_equal_one(tmp_path):
    """Coconut runs several forward passes per step (its latent thoughts) before one backward: under DDP the
    gradients still equal one process's."""
    head, tail = CONFIG.split("stages:\n")
    config = head.replace("{name: rim, memory_tokens: 1, blocks: 2}",
                          "{name: coconut, thoughts_per_step: 1, max_latent_steps: 2}") + "stages:\n" + "".join(
        f"  - {{name: s{k}, kind: latent, latent_steps: {k}, steps: 2, lr: 3.0e-3}}\n" for k in range(3)
    ) + tail[tail.index("train:"):]
    (tmp_path / "c.yaml").write_text(config)
    one_and_two_processes_agree(tmp_path)
