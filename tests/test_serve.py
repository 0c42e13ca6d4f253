"""Serving: `rim answer` for every method, and `rim export` to a standard Hugging Face checkpoint that plain
transformers runs with no rim code, giving exactly `rim answer`'s answers from `question + K blocks`."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from rim.cli import main
from rim.config import load_config

QUESTIONS = ["1 2 3", "4 5 6", "7 8", "0 0 1 4", "9 9 9"]  # unequal lengths: the batch is padded
RIM_STAGES = ["{name: grounding, kind: grounding, steps: 2, lr: 1e-4}",
              "{name: refinement, kind: refinement, steps: 2, lr: 1e-4}"]  # lr ~ 0: varied, non-trivial outputs
OTHER = {
    "nocot": (["{name: sft, kind: sft, steps: 1}"], []),
    "cot": (["{name: sft, kind: sft, steps: 1}"], []),
    "pause": (["{name: sft, kind: sft, steps: 1}"], []),
    "icot": (["{name: sft, kind: sft, steps: 1}"], []),
    "coconut": (["{name: s0, kind: latent, steps: 1, latent_steps: 0}",
                 "{name: s1, kind: latent, steps: 1, latent_steps: 1}"], ["method.max_latent_steps=1"]),
}


def tiny_run(out: Path, method: str, stages: list[str], extra=()) -> Path:
    from rim.train.loop import train

    return train(load_config(None, [
        "model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", f"method.name={method}",
        "method.memory_tokens=1", "method.blocks=3", "data.options={digits: 3, n_train: 64, n_test: 8, n_valid: 8}",
        f"stages=[{', '.join(stages)}]", "train.batch_size=16", "train.progress=false", "train.device=cpu",
        "eval.latency_examples=1", f"output_dir={out}", *extra]))


def cli(monkeypatch, capsys, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """``rim ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def answers(monkeypatch, capsys, run: Path, *args: str) -> list[dict]:
    code, out, err = cli(monkeypatch, capsys, "answer", str(run), "-", "--device", "cpu", *args,
                         stdin="\n".join(QUESTIONS) + "\n")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def plain_transformers(folder: Path, suffix: str) -> list[str]:
    """Generated text per question from ``folder`` with stock transformers: ``question + suffix`` as text,
    greedy, with the exported generation config; one question at a time, and the same in one left-padded batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = []
    for question in QUESTIONS:
        ids = tok(question + suffix, return_tensors="pt").input_ids
        assert ids[0].tolist() == tok(question).input_ids + tok(suffix, add_special_tokens=False).input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    batch = tok([q + suffix for q in QUESTIONS], return_tensors="pt", padding=True)
    out = model.generate(**batch, do_sample=False)
    assert tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True) == texts
    return texts


@pytest.fixture(scope="module")
def rim_runs(tmp_path_factory) -> dict[str, Path]:
    """A RiM run trained in full from scratch, and a LoRA one on a local 'pretrained' model, each evaluated."""
    from rim.data.tasks import RunningSum
    from rim.eval.run import eval_run
    from rim.models.tiny import tiny_model, word_tokenizer

    tmp = tmp_path_factory.mktemp("serve")
    tok = word_tokenizer(RunningSum(digits=3).vocabulary())
    tiny_model(len(tok), "llama", layers=2, hidden=32, heads=2).save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    runs = {"full": tiny_run(tmp / "full", "rim", RIM_STAGES),
            "lora": tiny_run(tmp / "lora", "rim", RIM_STAGES,
                             [f"model.name={tmp / 'base'}", "model.train_mode=lora", "model.lora_rank=4"])}
    for run in runs.values():
        eval_run(run, max_eval=4, device="cpu")
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_exported_rim_model_answers_like_rim_in_plain_transformers(rim_runs, monkeypatch, capsys, tmp_path, mode):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rim.eval.run import load_run

    run = rim_runs[mode]
    (tmp_path / "hf.tmp").mkdir()  # a folder of the user's beside the output: left alone
    (tmp_path / "hf.tmp" / "notes.txt").write_text("mine")
    code, out, err = cli(monkeypatch, capsys, "export", str(run), str(tmp_path / "hf"))
    assert code == 0, err
    folder = tmp_path / "hf"
    assert (tmp_path / "hf.tmp" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.tmp"]  # no temporary folder left
    umask = os.umask(0)
    os.umask(umask)
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~umask  # readable as a folder made the usual way
    code, _, err = cli(monkeypatch, capsys, "export", str(run), str(tmp_path / "hf.tmp" / "notes.txt"))
    assert code == 2 and "notes.txt is a file; export into a new folder" in err
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_model.safetensors").exists()
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.do_sample is False and gen.max_new_tokens == 4 and gen.eos_token_id == 2
    block = "<b><m></b>"
    meta = json.loads((folder / "rim.json").read_text())
    assert meta["prompt_suffix"] == block * 3 and meta["blocks"] == 3 and meta["memory_tokens"] == 1
    card = (folder / "README.md").read_text()
    assert block * 3 in card and str(meta["prompt_suffix_ids"]) in card and "K = 3" in card and "M = 1" in card
    assert "64 training examples" in card and "| eval | running-sum / test | checkpoint | 4 | 3 |" in card

    seen = set()
    for k in (3, 5, 1):  # the trained K, and others chosen at inference
        records = answers(monkeypatch, capsys, run, "--blocks", str(k))
        texts = plain_transformers(folder, block * k)
        assert [r["output"] for r in records] == texts
        assert [r["answer"] for r in records] == [t.strip() for t in texts]
        assert all(r["blocks"] == k for r in records)
        seen.update(texts)
    assert len(seen) > 1  # the outputs differ between questions or K: the comparison is not between constants

    _, model, tok, method, _ = load_run(run, device="cpu")  # as trained: a peft model in LoRA mode
    ids = tok(QUESTIONS[0] + block * 5, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok(QUESTIONS[0]).input_ids + method.block * 5  # the text is rim's prompt
    with torch.no_grad():  # the same next-token logits, not only the same argmax
        assert torch.allclose(model(ids).logits, AutoModelForCausalLM.from_pretrained(folder)(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_block_readouts_are_the_answers_after_k_blocks(rim_runs, monkeypatch, capsys):
    run = rim_runs["full"]
    records = answers(monkeypatch, capsys, run, "--blocks", "4", "--block-readouts")
    assert len(records) == len(QUESTIONS) and all(len(r["block_readouts"]) == 4 for r in records)
    assert [r["block_readouts"][-1] for r in records] == [r["answer"] for r in records]
    for k in (1, 2):
        assert [r["block_readouts"][k - 1] for r in records] == [
            r["answer"] for r in answers(monkeypatch, capsys, run, "--blocks", str(k))]
    assert all(r["latency_ms"] >= r["ttft_ms"] > 0 for r in records)
    code, out, _ = cli(monkeypatch, capsys, "answer", str(run), "1 2 3", "--device", "cpu")
    assert code == 0 and json.loads(out)["question"] == "1 2 3" and json.loads(out)["blocks"] == 3  # trained K


@pytest.mark.slow
def test_questions_from_a_file_text_or_json(rim_runs, monkeypatch, capsys, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "1 2 3", "answer": "6"}\n\n4 5 6\n')
    code, out, err = cli(monkeypatch, capsys, "answer", str(rim_runs["full"]), "--file", str(path), "--device", "cpu")
    assert code == 0, err
    assert [json.loads(line)["question"] for line in out.splitlines()] == ["1 2 3", "4 5 6"]
    code, _, err = cli(monkeypatch, capsys, "answer", str(rim_runs["full"]), "1 2 3", "--file", str(path))
    assert code == 2 and "not both" in err
    code, _, err = cli(monkeypatch, capsys, "answer", str(rim_runs["full"]), " ")
    assert code == 2 and "the question is empty" in err
    path.write_text('{"question": "1 2 3"}\n{"question": 12}\n')
    code, out, err = cli(monkeypatch, capsys, "answer", str(rim_runs["full"]), "--file", str(path), "--device", "cpu")
    assert code == 2 and f"{path}, line 2: 'question' must be non-empty text, not 12" in err
    assert [json.loads(line)["question"] for line in out.splitlines()] == ["1 2 3"]  # answered before line 2


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(OTHER))
def test_every_method_answers_and_exports_or_says_why_not(tmp_path, monkeypatch, capsys, method):
    from rim.data.tasks import RunningSum

    stages, extra = OTHER[method]
    run = tiny_run(tmp_path / method, method, stages, extra)
    records = answers(monkeypatch, capsys, run)
    cot = method in ("cot", "icot", "coconut")
    assert [r["question"] for r in records] == QUESTIONS
    assert all(r["answer"] == RunningSum().extract_answer(r["output"], cot=cot) and "blocks" not in r
               for r in records)
    code, _, err = cli(monkeypatch, capsys, "answer", str(run), "1 2 3", "--blocks", "2")
    assert code == 2 and "no memory blocks" in err
    code, _, err = cli(monkeypatch, capsys, "export", str(run), str(tmp_path / "hf"))
    if method == "coconut":
        assert code == 2 and "not a prompt suffix" in err and not (tmp_path / "hf").exists()
        return
    assert code == 0, err
    suffix = json.loads((tmp_path / "hf/rim.json").read_text())["prompt_suffix"]
    assert suffix == ("<pause>" * 9 if method == "pause" else "")  # K (M + 2) pauses by default
    assert [r["output"] for r in records] == plain_transformers(tmp_path / "hf", suffix)
    # the card's own answer rule, run on these outputs and on one without "####", gives rim answer's answers
    rule = next(line for line in (tmp_path / "hf/README.md").read_text().splitlines() if line.startswith("answer ="))
    for text in [r["output"] for r in records] + ["12 + 3 no separator"]:
        scope = {"text": text}
        exec(rule, scope)
        assert scope["answer"] == RunningSum().extract_answer(text, cot=cot)


def test_the_card_names_the_k_that_refinement_trained_with():
    from rim.config import load_config
    from rim.serve import trained_blocks

    cfg = load_config(None, ["method.blocks=4", "stages=[{name: g, kind: grounding, steps: 1},"
                                               " {name: r, kind: refinement, steps: 1, blocks: 6}]"])
    assert trained_blocks(cfg) == 6
    assert trained_blocks(load_config(None, ["method.blocks=4"])) == 4
