"""Exact resume, checkpoint integrity and faults on the tiny CPU config: a run stopped and resumed equals an
uninterrupted one (losses and weights), also across the stage switch; broken checkpoints are skipped; SIGTERM
checkpoints and exits; a non-finite loss stops the run without saving anything after the last good checkpoint;
the TensorBoard tracker receives the same curve as metrics.jsonl."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

from rim.config import ConfigError, load_config
from rim import rundir
from rim.errors import CheckpointError, NonFiniteLoss
from rim.rundir import RunDir, verify
from rim.train import checkpoint, loop, optim, sampling
from rim.train.checkpoint import Checkpointer
from rim.train.loop import train
from rim.train.state import load_state

pytestmark = pytest.mark.slow  # every test here trains a model

TINY = ["model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", "train.progress=false",
        "train.device=cpu", "train.batch_size=8", "train.log_every=1", "train.save_every=2",
        "data.options={n_train: 36, n_test: 8, n_valid: 8}"]
RIM = ["stages=[{name: grounding, kind: grounding, steps: 6, lr: 3e-3, warmup: 0.5},"
       " {name: refinement, kind: refinement, steps: 5, lr: 1e-3, warmup: 0.6, dropout: 0.2, reset_optimizer: false}]"]
RL = ["stages=[{name: grounding, kind: grounding, steps: 4, lr: 3e-3},"
      " {name: refinement, kind: refinement, steps: 2, lr: 1e-3},"
      " {name: rl, kind: rl, steps: 5, lr: 2e-2, group_size: 4, temperature: 2.0, kl_weight: 0.5}]"]
ICOT = ["method.name=icot", "method.remove_per_epoch=3", "stages=[{name: sft, kind: sft, steps: 9, lr: 3e-3}]"]


def config(tmp_path, name, extra):
    return load_config(None, [*TINY, *extra, f"output_dir={tmp_path / name}"])


def losses(run):
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


def weights(run):
    return load_file(run / "checkpoint" / "model.safetensors")


def crashed_run(tmp_path, monkeypatch, step: int, resume: str | None = None):
    """The RIM config of run ``cut``, trained (or resumed) until a crash right after ``step``."""
    cfg = config(tmp_path, "cut", RIM)
    with monkeypatch.context() as m:
        crash_at(m, step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg, resume=resume)
    return cfg


def crash_at(monkeypatch, step):
    """Make training die (like a killed process) right after optimizer step ``step`` has been handled."""
    original = Checkpointer.on_step

    def on_step(self, model, pos, *args, **kwargs):
        original(self, model, pos, *args, **kwargs)
        if pos.step == step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Checkpointer, "on_step", on_step)


def assert_same_run(a, b):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5), f"loss differs at step {step}"
    wa, wb = weights(a), weights(b)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("recipe,crash", [(RIM, 5), (RIM, 7), (RIM, 9), (ICOT, 7), ([*RIM, "train.log_every=3"], 5)],
                         ids=["grounding", "stage-switch", "refinement", "icot-dynamic", "log-window-across-resume"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, recipe, crash):
    full = train(config(tmp_path, "full", recipe))
    cfg = config(tmp_path, "cut", recipe)
    with monkeypatch.context() as m:
        crash_at(m, crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
    resumed = train(cfg, resume="auto")
    assert_same_run(full, resumed)
    events = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [crash - crash % 2]


def test_a_run_resumed_inside_the_rl_stage_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Crash at step 9, resume from step 8 (two rl steps in): the sampled rewards, losses and final weights are
    those of the uninterrupted run, and the KL reference comes back from the checkpoint: the weights of the
    refinement stage's end (step 6), not the weights at step 8. A tiny model this short-trained answers nothing
    right, so the reward here is the parity of the first sampled token: it varies within groups and depends on
    every sample."""
    from rim.train.rl import GRPO

    sample = GRPO.sample

    def parity(self, model, examples):
        out = sample(self, model, examples)
        out.rewards = torch.tensor([float(c[0] % 2) for c in out.completions])
        return out

    monkeypatch.setattr(GRPO, "sample", parity)
    full = train(config(tmp_path, "full", RL))
    cfg = config(tmp_path, "cut", RL)
    with monkeypatch.context() as m:
        crash_at(m, 9)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
    reference = load_state(tmp_path / "cut" / "checkpoints" / "step-8")[1]["rl_reference"]
    stage_start, step8 = (load_file(tmp_path / "cut" / "checkpoints" / s / "model.safetensors")
                          for s in ("step-6", "step-8"))
    assert reference.keys() and all(torch.equal(reference[k], stage_start[k]) for k in reference if k in stage_start)
    assert any(not torch.equal(reference[k], step8[k]) for k in reference if k in step8)
    resumed = train(cfg, resume="auto")
    assert_same_run(full, resumed)
    events = [map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) for run in (full, resumed)]
    rewards = [{e["step"]: (e["reward"], e["kl"]) for e in run if e["event"] == "train" and "reward" in e}
               for run in events]
    assert rewards[0] == rewards[1] and len(rewards[0]) == 5


def test_a_resumed_runs_training_time_counts_the_time_before_its_checkpoint(tmp_path, monkeypatch):
    """The done event's train_s (rim compare's "train s") is the whole run's: a first process whose clock reads
    100 s a step, then a resumed one on the real clock, report more than 100 s, not the resumed part only."""
    clock = [0.0]

    def tick() -> float:
        clock[0] += 100.0
        return clock[0]

    with monkeypatch.context() as m:
        m.setattr(loop, "time", types.SimpleNamespace(perf_counter=tick))
        crashed_run(tmp_path, monkeypatch, 5)
    run = train(config(tmp_path, "cut", RIM), resume="auto")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["train_s"] > 100


def test_checkpoints_training_time_includes_the_time_between_stages(tmp_path, monkeypatch):
    """A checkpoint's train_s counts from the run's start, so the switch between stages (here 0.5 s of setting up
    the second one) is in it, as it is in the done event's."""
    original = sampling.StageData

    def slow_setup(data, method, stage, seed):
        if stage.kind == "refinement":
            time.sleep(0.5)
        return original(data, method, stage, seed)

    monkeypatch.setattr(sampling, "StageData", slow_setup)
    run = train(config(tmp_path, "run", RIM))
    spent = {step: load_state(run / "checkpoints" / f"step-{step}")[0].train_s for step in (6, 8)}
    assert spent[8] - spent[6] >= 0.5  # step 6 ends the grounding stage; step 8 is in refinement
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["train_s"] >= spent[8]


def test_broken_newest_checkpoint_falls_back_to_the_one_before(tmp_path, monkeypatch):
    cfg = crashed_run(tmp_path, monkeypatch, 9)
    newest = tmp_path / "cut" / "checkpoints" / "step-8"
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # truncated, as by a crash during a copy
    with pytest.raises(CheckpointError, match="does not match its hash"):
        verify(newest)
    warnings = []
    assert RunDir(tmp_path / "cut").latest_valid(warnings.append) == tmp_path / "cut" / "checkpoints" / "step-6"
    assert "step-8" in warnings[0]
    with pytest.raises(CheckpointError, match="step-8"):
        train(cfg, resume=str(newest))  # an explicit broken checkpoint is an error, not a silent fallback
    assert_same_run(train(config(tmp_path, "full", RIM)), train(cfg, resume="auto"))


def test_resuming_an_older_checkpoint_drops_the_abandoned_newer_ones(tmp_path, monkeypatch):
    crashed_run(tmp_path, monkeypatch, 9)
    older = tmp_path / "cut" / "checkpoints" / "step-4"
    crashed_run(tmp_path, monkeypatch, 5, resume=str(older))  # stop again before step-6 is rewritten
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert max(losses(tmp_path / "cut")) == 5


def test_resume_reports_changed_config_and_a_fresh_dir_refuses_to_mix(tmp_path, monkeypatch, capsys):
    cfg = crashed_run(tmp_path, monkeypatch, 3)
    run = tmp_path / "cut"
    for name in ("best.old", "notes.old"):  # as a crash while replacing best/ leaves it; a folder not rim's
        (run / name).mkdir()
        (run / name / "rim.json").write_text('{"step": 2}')
    with pytest.raises(FileExistsError, match="--resume auto"):
        train(cfg)
    assert (run / "best.old").is_dir() and not (run / "best").exists()  # a refused start changes nothing
    changed = load_config(None, [*TINY, *RIM, f"output_dir={run}", "train.max_grad_norm=0.5"])
    train(changed, resume="auto")
    assert "train.max_grad_norm: 1.0 -> 0.5" in capsys.readouterr().out
    assert json.loads((run / "best" / "rim.json").read_text()) == {"step": 2}  # put back by the resumed run
    assert not (run / "best.old").exists() and (run / "notes.old").is_dir()


def test_resuming_into_a_shortened_stage_is_refused_naming_the_key(tmp_path, monkeypatch):
    """A stage cut below the checkpoint's place in it: an error naming the stage's key (it used to spin forever);
    nothing is written before the refusal (config.yaml, the log and the checkpoints stay as they were), and the run
    resumes once the stage is long enough again."""
    crashed_run(tmp_path, monkeypatch, 5)
    run = tmp_path / "cut"
    before = {name: (run / name).read_text() for name in ("config.yaml", "metrics.jsonl")}
    short = RIM[0].replace("steps: 6", "steps: 3")
    with pytest.raises(ConfigError, match=r"stages\.0.*now lasts 3 steps.*step 4"):
        train(load_config(None, [*TINY, short, f"output_dir={run}"]), resume="auto")
    assert (run / "checkpoints" / "step-4").is_dir()
    assert {name: (run / name).read_text() for name in before} == before
    train(config(tmp_path, "cut", RIM), resume="auto")
    assert max(losses(run)) == 11


def test_resume_auto_without_a_step_checkpoint_starts_again_unless_the_run_finished(tmp_path, monkeypatch):
    """A run that died before its first checkpoint has nothing to continue: ``--resume auto`` starts it again
    (as documented) instead of asking for ``--resume auto``; a finished run is never cleared by it."""
    cfg = config(tmp_path, "cut", [*RIM, "train.save_every=100"])
    with monkeypatch.context() as m:
        crash_at(m, 3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
    run = tmp_path / "cut"
    assert (run / "metrics.jsonl").is_file() and not list(run.glob("checkpoints/step-*"))
    train(cfg, resume="auto")
    assert sorted(losses(run)) == list(range(1, 12))  # one run from step 1, no leftover lines of the first
    shutil.rmtree(run / "checkpoints")  # a finished run whose step checkpoints are gone
    with pytest.raises(FileExistsError, match="no step checkpoint to resume from") as err:
        train(cfg, resume="auto")
    assert "--resume auto" not in str(err.value)
    assert (run / "checkpoint" / "rim.json").is_file()


def test_resume_auto_never_clears_step_checkpoints_that_fail_to_verify(tmp_path, monkeypatch, capsys):
    crashed_run(tmp_path, monkeypatch, 5)
    steps = sorted((tmp_path / "cut" / "checkpoints").iterdir())
    for step in steps:  # every one altered: nothing to resume from, but not nothing to lose
        with open(step / "model.safetensors", "ab") as f:
            f.write(b"x")
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config(tmp_path, "cut", RIM), resume="auto")
    assert capsys.readouterr().out.count("skipping a broken checkpoint") == 2
    assert sorted((tmp_path / "cut" / "checkpoints").iterdir()) == steps


def test_a_crash_while_replacing_a_checkpoint_folder_keeps_the_old_one(tmp_path, monkeypatch):
    """``best/`` is replaced on every improvement: the old folder is moved aside first, so a crash before the new
    one is in place leaves ``best.old``, which a resumed run puts back."""
    from conftest import make_tiny

    model, tok, _ = make_tiny("llama")
    cfg = load_config()
    best = tmp_path / "best"
    checkpoint.write_checkpoint(model, tok, cfg, best, {"step": 1})
    real_replace = os.replace

    def crash_on_the_new_folder(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(rundir.os, "replace", crash_on_the_new_folder)
        with pytest.raises(OSError, match="simulated crash"):
            checkpoint.write_checkpoint(model, tok, cfg, best, {"step": 2})
    assert not best.exists() and (tmp_path / "best.old").is_dir()
    (tmp_path / "notes.old").mkdir()  # not rim's
    RunDir(tmp_path).restore_moved_aside()
    verify(best)
    assert json.loads((best / "rim.json").read_text())["step"] == 1 and not (tmp_path / "best.old").exists()
    checkpoint.write_checkpoint(model, tok, cfg, best, {"step": 3})  # a normal replacement leaves nothing aside
    assert json.loads((best / "rim.json").read_text())["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "notes.old"]


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run = train(config(tmp_path, "run", [*RIM, "train.keep_last=2"]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-11"]


def test_non_finite_loss_stops_and_saves_nothing_after_it(tmp_path, monkeypatch):
    original = loop.step_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(loop, "step_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="by step 5"):
        train(config(tmp_path, "run", RIM))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not (run / "checkpoint").exists()


def train_command(tmp_path, steps: int, save_every: int) -> tuple[list[str], dict]:
    """``rim train`` of a small No-CoT run as a subprocess command, and its environment."""
    config_file = tmp_path / "empty.yaml"
    config_file.write_text("{}\n")
    cmd = [sys.executable, "-m", "rim.cli", "train", str(config_file), *TINY, f"train.save_every={save_every}",
           f"stages=[{{name: sft, kind: sft, steps: {steps}, lr: 1e-3}}]", "method.name=nocot",
           f"output_dir={tmp_path / 'run'}"]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(tmp_path):
    cmd, env = train_command(tmp_path, steps=400, save_every=1000)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and '"event": "train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume auto" in err
    saved = RunDir(tmp_path / "run").latest_valid()
    assert saved is not None and 0 < int(saved.name[5:]) < 400
    done = subprocess.run([*cmd, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["event"] == "done" and last["steps"] == 400
    assert sorted(losses(tmp_path / "run")) == list(range(1, 401))  # the log holds every step once


def test_sigkill_loses_at_most_one_checkpoint_interval(tmp_path):
    cmd, env = train_command(tmp_path, steps=300, save_every=5)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and RunDir(tmp_path / "run").latest_valid(lambda _: None) is None:
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=60)
    saved = RunDir(tmp_path / "run").latest_valid(lambda _: None)
    logged = max(losses(tmp_path / "run"))
    assert saved is not None and logged - int(saved.name[5:]) < 5 + 5  # the unsaved tail is under an interval
    done = subprocess.run([*cmd, "--resume", "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(losses(tmp_path / "run")) == list(range(1, 301))


def test_tensorboard_tracker_gets_the_training_curve(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(config(tmp_path, "run", [*RIM, "train.trackers=[tensorboard]", "train.tracker_project=exp"]))
    files = list((run / "exp").rglob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("loss/grounding")]
    logged = losses(run)
    assert [s for s, _ in curve] == list(range(1, 7))
    assert all(v == pytest.approx(logged[s], rel=1e-6) for s, v in curve)


def test_a_resumed_optimizer_keeps_its_own_implementation():
    """A state saved by multi-tensor AdamW (as on a CPU) loaded into a fused one (as on a GPU) steps fused, from the
    same moments: plain ``load_state_dict`` would bring back the saved ``fused=None``."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    saved_by = optim.adamw(weights, lr=1e-2)
    for _ in range(2):
        sum((w ** 2).sum() for w in weights).backward()
        saved_by.step()
        saved_by.zero_grad()
    state = copy.deepcopy(saved_by.state_dict())  # as read back from a file: not the tensors saved_by steps
    assert not state["param_groups"][0]["fused"]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused = torch.optim.AdamW(copies, lr=1e-2, fused=True)
    fused.load_state_dict(optim.with_implementation_of(fused, state))
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["lr"] == 1e-2
    for opt, params in ((saved_by, weights), (fused, copies)):
        sum((w ** 2).sum() for w in params).backward()
        opt.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights, copies))
    assert int(fused.state[copies[0]]["step"]) == 3


def test_train_lines_report_the_throughput_of_their_window(tmp_path, monkeypatch):
    """``tokens_per_s`` is the tokens since the previous ``train`` line over the time since then, checkpoints left
    out: a clock that ticks one second per reading and 1,000 during each checkpoint save."""
    clock = [0.0]

    def tick(seconds: float = 1.0) -> float:
        clock[0] += seconds
        return clock[0]

    save = Checkpointer.save
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=tick))
    monkeypatch.setattr(Checkpointer, "save", lambda *a: (save(*a), tick(1000.0)))
    run = train(config(tmp_path, "run", [*RIM, "train.log_every=2", "train.save_every=3"]))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for stage in ("grounding", "refinement"):
        logged = [e for e in lines if e["event"] == "train" and e["stage"] == stage]
        tokens = [0, *(e["tokens"] for e in logged)]
        deltas = [b - a for a, b in zip(tokens, tokens[1:])]
        # lines at stage steps 2, 4 and the stage end (6 or 5); saves at steps 3 and 9 restart the second window,
        # which then holds only step 4 of its two steps (the save at each stage's end comes after its line)
        assert [e["tokens_per_s"] == d for e, d in zip(logged, deltas)] == [True, False, True]
        assert 1 < logged[1]["tokens_per_s"] < deltas[1]
