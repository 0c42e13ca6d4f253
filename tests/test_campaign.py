"""rim campaign: spec loading, the plan, the scheduler's deadline, packing, the report, the weight transport, and
the CPU smoke rehearsal of the exact GSM8K command (slow)."""

from __future__ import annotations

import json
import sys
import tarfile
import time
from pathlib import Path

import pytest

from rim.campaign import transport
from rim.campaign.plan import PlanError, Speed, plan_budget, stage_steps
from rim.campaign.run import Proc, pack, run_processes, worker_env
from rim.campaign.spec import load_campaign
from rim.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "configs" / "campaign").glob("*.yaml"))
NAME = __import__("re").compile(r"[A-Za-z0-9._-]+")


@pytest.fixture(autouse=True)
def data_dir(monkeypatch):
    data = ROOT.parent.parent / "shared" / "data"
    for candidate in (Path(__import__("os").environ.get("RIM_DATA_DIR", "/nonexistent")), ROOT.parent / "shared" /
                      "data", data, Path("/work/shared/data")):
        if candidate.is_dir():
            monkeypatch.setenv("RIM_DATA_DIR", str(candidate))
            return candidate
    pytest.skip("no ../shared/data")


@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_campaign_spec_loads_with_every_job_config(path, smoke):
    spec = load_campaign(path, smoke)
    jobs = spec.jobs()
    assert len({j.label for j in jobs}) == len(jobs)
    for job in jobs:
        cfg = job.config()
        assert NAME.fullmatch(job.label)
        if smoke:
            assert cfg.model.name == "tiny"
        else:
            assert cfg.model.name == "smollm2-135m" and cfg.model.lora_rank == 128
            assert cfg.eval.select_split == "valid" and cfg.data.eval_split == "test"
    assert min(j.seed for j in jobs[: len({(j.task, j.method) for j in jobs})]) == 0  # first seeds come first


def test_the_issues_jobs():
    gsm = load_campaign(ROOT / "configs/campaign/gsm8k-smollm2.yaml")
    assert sorted(j.label for j in gsm.jobs()) == sorted(f"gsm8k-{m}-s{s}" for m in ("nocot", "cot", "pause", "rim")
                                                       for s in (0, 1, 2))
    rim = next(j for j in gsm.jobs() if j.method == "rim").config()
    assert (rim.method.blocks, rim.method.memory_tokens, [s.kind for s in rim.stages]) == (8, 2, ["grounding",
                                                                                               "refinement"])
    assert rim.data.train_split == "train_no_valid" and gsm.tasks[0].ood == ["gsm-hard", "svamp", "multiarith"]
    logic = load_campaign(ROOT / "configs/campaign/logic-smollm2.yaml")
    methods = {t.name: [m.label for m in t.methods] for t in logic.tasks}
    assert methods == {"prosqa": ["nocot", "cot", "coconut", "icot", "rim"], "prontoqa": ["nocot", "cot", "rim"],
                       "mult5x5": ["nocot", "cot", "icot", "rim"]}
    coconut = next(j for j in logic.jobs() if j.method == "coconut").config()
    assert coconut.method.thoughts_per_step == 1 and [s.latent_steps for s in coconut.stages] == list(range(7))


def test_bad_spec_keys_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tasks: {t: {methods: {a: {config: x.yaml}}}}\n")
    with pytest.raises(ConfigError, match="tasks.t.methods.a.config.*no file"):
        load_campaign(path)
    path.write_text("deadline: 3\ntasks: {}\n")
    with pytest.raises(ConfigError, match="unknown campaign key 'deadline'"):
        load_campaign(path)
    (tmp_path / "r.yaml").write_text((ROOT / "configs/cpu/mult4x4_rim.yaml").read_text())
    path.write_text("tasks: {t: {methods: {a: {config: r.yaml, overrides: [train.nope=1]}}}}\n")
    with pytest.raises(ConfigError, match="job t-a-s0.*train.nope"):
        load_campaign(path)


def test_plan_gives_every_method_of_a_task_the_steps_its_slowest_fits():
    m = {"a": {1: Speed(10.0, 0.1), 4: Speed(5.0, 0.1)}, "b": {1: Speed(5.0, 0.2), 4: Speed(2.0, 0.2)}}
    plan = plan_budget({"t": ["a", "b", "a", "b"]}, {"a": 10, "b": 10}, m, [1, 4], 100.0, 1.0)
    # level 1: 4 waves of 25 s, b fits (25 - 2) * 5 = 115; level 4: one slot of 100 s, (100 - 2) * 2 = 196
    assert (plan.concurrency, plan.waves, plan.steps) == (4, 1, {"t": 196})
    assert [row["steps"]["t"] for row in plan.levels] == [115, 196]
    with pytest.raises(PlanError, match="no concurrency"):
        plan_budget({"t": ["a"]}, {"a": 10_000}, m, [1, 4], 100.0, 1.0)


def test_stage_steps_keep_proportions_and_the_total():
    assert stage_steps([3, 1], 10) == [8, 2]
    assert stage_steps([5, 5, 5, 5, 5, 5, 20], 100) == [10, 10, 10, 10, 10, 10, 40]
    assert sum(stage_steps([1, 1, 10], 5)) == 5 and min(stage_steps([1, 1, 10], 5)) == 1


def _job(tmp_path: Path, label: str, code: str) -> Proc:
    return Proc(label, [sys.executable, "-c", code], tmp_path / "logs" / f"{label}.log")


def test_deadline_stops_a_job_and_keeps_the_finished_ones(tmp_path):
    root, out = tmp_path / "camp", tmp_path / "out"
    run = root / "runs" / "fast"
    fast = (f"import pathlib; p = pathlib.Path({str(run)!r}) / 'eval-best'; p.mkdir(parents=True); "
            "(p / 'results.json').write_text('{\"final_block_accuracy\": 0.5}')")
    procs = [_job(tmp_path, "fast", fast), _job(tmp_path, "slow", "import time; time.sleep(60)"),
             _job(tmp_path, "late", "pass")]
    start = time.monotonic()
    run_processes(procs, 2, start + 3.0, worker_env(1), on_finish=lambda p: pack(root, out))
    assert time.monotonic() - start < 3.0 + 6.0  # stopped at the deadline (SIGTERM, then SIGKILL after grace)
    assert [p.status for p in procs] == ["done", "stopped", "done"]
    with tarfile.open(out / "results.tar.gz") as tar:
        assert tar.getnames() == ["runs/fast/eval-best/results.json"]


def test_pack_keeps_to_the_devices_limits(tmp_path):
    root = tmp_path / "camp"
    for i in range(3):
        run = root / "runs" / f"r{i}"
        (run / "checkpoint").mkdir(parents=True)
        (run / "checkpoint" / "adapter_model.safetensors").write_bytes(b"w" * 1000)
        (run / "config.yaml").write_text("a: 1\n")
        (run / "eval-best").mkdir()
        (run / "eval-best" / "predictions.jsonl").write_text("{}\n")
        (root / "jobs").mkdir(exist_ok=True)
        (root / "jobs" / f"r{i}.log").write_bytes(b"x" * 300_000)
    (root / "campaign.json").write_text("{}")
    written = pack(root, tmp_path / "out")
    assert written == ["campaign.json", "results.tar.gz", "predictions.tar.gz", "logs.tar.gz"]
    files = list((tmp_path / "out").rglob("*"))
    assert len(files) <= 8 and all(NAME.fullmatch(f.name) and f.stat().st_size < 16 << 20 for f in files)
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert not any("checkpoint" in n for n in tar.getnames())  # weights stay on the device
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        assert tar.getmember("jobs/r0.log").size == 256 * 1024  # the end of each log only


def test_split_stash_assemble_round_trip_and_corruption(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(bytes(range(256)) * 1001)
    manifest = transport.split_file(src, tmp_path / "parts", 2)
    assert [p["size"] for p in manifest["parts"]] == [128128, 128128]
    stash = tmp_path / "stash"
    transport.stash(tmp_path / "parts" / "part1", stash)  # call 1
    out = transport.assemble(tmp_path / "w" / "model.gguf", [stash, tmp_path / "parts" / "part2"])  # call 2
    assert out.read_bytes() == src.read_bytes()
    part2 = tmp_path / "parts" / "part2" / "model.gguf.part2"
    data = bytearray(part2.read_bytes())
    data[5] ^= 1
    part2.write_bytes(bytes(data))
    with pytest.raises(transport.TransportError, match="part2: sha256 does not match"):
        transport.assemble(tmp_path / "w2" / "model.gguf", [stash, tmp_path / "parts" / "part2"])
    assert not (tmp_path / "w2" / "model.gguf").exists()
    with pytest.raises(transport.TransportError, match="model.gguf.part1 is in none of"):  # a fresh machine
        transport.assemble(tmp_path / "w3" / "model.gguf", [tmp_path / "parts" / "part2"])
    assert transport.main(["assemble", str(tmp_path / "w4" / "m"), str(tmp_path / "parts" / "part2")]) == 2


def test_gguf_env_override(tmp_path, monkeypatch):
    from rim.models import hub

    monkeypatch.setenv("RIM_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="RIM_SMOLLM2_GGUF"):
        hub.find_gguf("smollm2-135m")
    (tmp_path / "m.gguf").write_bytes(b"x")
    monkeypatch.setenv("RIM_SMOLLM2_GGUF", str(tmp_path / "m.gguf"))
    assert hub.find_gguf("smollm2-135m") == tmp_path / "m.gguf"


@pytest.mark.slow
def test_gsm8k_campaign_smoke_end_to_end(tmp_path, monkeypatch):
    """The exact command of the GPU run with its smoke setting: calibration at 1 and 2 processes, the plan, 4 jobs
    2 at a time, timing alone, the report and the pack, all within the smoke's deadline."""
    from rim.campaign.report import report_from_pack
    from rim.cli import main

    monkeypatch.chdir(tmp_path)  # output_dir is relative: runs/campaign/... lands here
    start = time.monotonic()
    assert main(["campaign", str(ROOT / "configs/campaign/gsm8k-smollm2.yaml"), "--smoke", "--out", "out"]) == 0
    assert time.monotonic() - start < 125  # the smoke deadline is 115 s
    state = json.loads((tmp_path / "out" / "campaign.json").read_text())
    assert {s["level"] for s in state["calibration"] if "steps" in s} == {1, 2}
    assert state["plan"]["concurrency"] in (1, 2) and state["plan"]["steps"]["gsm8k"] >= 1
    statuses = {label: j["status"] for label, j in state["jobs"].items()}
    assert set(statuses.values()) <= {"done", "stopped", "not started"}  # a loaded CPU may cut the last wave
    done = sorted(label.split("-")[1] for label, s in statuses.items() if s == "done")
    assert done, statuses
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(names) <= 8 and "report.md" in names
    rows = report_from_pack(tmp_path / "out", tmp_path / "again")["gsm8k"]
    assert set(done) <= {r["label"] for r in rows}  # every finished job is in the table
    assert all("ood_svamp_accuracy" in r for r in rows if r["label"] in done)
    report = (tmp_path / "again" / "report.md").read_text()
    assert "Share of CoT's gain" in report and "gsm8k" in report
    assert "budgets DIFFER" not in report  # RiM's two stages get no more steps than the one-stage methods
