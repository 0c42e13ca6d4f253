"""Scale-out through torch.distributed: two CPU processes (gloo, launched by torchrun) train exactly like one
process at the same global batch (batch_size x grad_accum), and only the main process writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if "Writing" not in line and "Loading" not in line]
    assert done.returncode == 0, "\n".join(errors)[-4000:]


def losses(run_dir) -> dict[int, float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed")
def test_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    (tmp_path / "c.yaml").write_text(CONFIG)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    run([sys.executable, "-m", "rim.cli", "train", "c.yaml", "output_dir=one"], tmp_path)
    run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "rim.cli", "train", "c.yaml", "output_dir=two"],
        tmp_path)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), f"step {step}"
    a, b = (load_file(tmp_path / d / "checkpoint" / "model.safetensors") for d in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
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
