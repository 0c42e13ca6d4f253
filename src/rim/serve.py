"""Serving a trained run: answer questions with it (``rim answer``) and export it as a standard Hugging Face
checkpoint (``rim export``) that stock engines run without rim.

A method whose inference is ``method.prompt`` + greedy decoding needs nothing beyond a causal LM: its prompt is the
question followed by a fixed suffix of tokens. For RiM that suffix is the K memory blocks ``<b> <m>*M </b>``, read
under a plain causal mask, so the exported model answers like ``rim answer`` when given ``question + suffix``.
Coconut is refused: its thoughts are hidden states fed back as inputs, which no prompt suffix can express.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rim.config import Config, ConfigError, inference_blocks
from rim.data.tasks import Example, Task
from rim.eval.evaluate import answer_budget, answer_times, training_reasoning
from rim.eval.run import load_run
from rim.methods.base import Method, TokenizedExample
from rim.rundir import RunDir

TITLES = {
    "rim": "Reasoning in Memory (RiM): the model reads K memory blocks appended to the question in the prefill and "
           "answers right after them; nothing is generated before the answer",
    "nocot": "No-CoT: supervised fine-tuning on the answer right after the question",
    "cot": "CoT: supervised fine-tuning on the reasoning steps as text, then `####` and the answer",
    "pause": "Pause tokens: N fixed `<pause>` tokens between question and answer",
    "icot": "iCoT-SI (stepwise internalization): CoT fine-tuning with the reasoning removed from the front over "
            "training; the answer follows `####`",
}


@dataclass
class Served:
    """A run loaded for answering: its config, model (LoRA merged), tokenizer, method, task, K and token budget."""

    cfg: Config
    model: object
    tokenizer: object
    method: Method
    task: Task
    blocks: int
    max_new_tokens: int


def question_example(served: Served, question: str) -> TokenizedExample:
    """A raw question tokenized as the run tokenizes its data (prompt format, special tokens), without steps or
    answer."""
    return served.method.tokenize(served.task, served.tokenizer, Example(question, (), ""),
                                  served.cfg.data.prompt_format)


def generation_budget(cfg: Config, task: Task, method: Method, tokenizer) -> int:
    """Tokens to generate: the task's answer budget, plus for methods that reason in text room for the longest
    reasoning the run trained on (what ``rim eval`` allows; a raw question has no steps to measure)."""
    return answer_budget(task, method, training_reasoning(cfg, task, method, tokenizer))


def open_run(run_dir: str | Path, checkpoint: str = "checkpoint", device: str = "auto", blocks: int | None = None,
             max_new_tokens: int | None = None, overrides: list[str] | None = None) -> Served:
    """Load a run for answering; LoRA is merged into the base weights (faster, and the weights ``rim export``
    writes). ``blocks`` (K) applies to methods with memory blocks only; ``overrides``: as for ``load_run``."""
    cfg, model, tokenizer, method, task = load_run(run_dir, device, checkpoint, overrides)
    if blocks is not None and not method.any_block:
        raise ConfigError(f"--blocks: method {method.name!r} has no memory blocks")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    budget = max_new_tokens if max_new_tokens is not None else generation_budget(cfg, task, method, tokenizer)
    if blocks is not None and blocks < 1:
        raise ConfigError(f"--blocks must be >= 1, not {blocks}")
    k = blocks if blocks is not None else inference_blocks(cfg)
    return Served(cfg, model, tokenizer, method, task, k, budget)


def _generate(served: Served, prompt: list[int]):
    tok = served.tokenizer
    return served.method.generate(served.model, [prompt], tok.pad_token_id, tok.eos_token_id, served.max_new_tokens)


def answer(served: Served, questions: Iterable[str], block_readouts: bool = False) -> Iterator[dict]:
    """One record per question, decoded alone (batch 1, so the times are each question's own): the answer, the
    generated text, the time to the first answer token and to the whole answer (ms), and with ``block_readouts``
    the answer read out after each block k = 1..K (methods with memory blocks only)."""
    method, tok = served.method, served.tokenizer
    if block_readouts and not method.any_block:
        raise ConfigError(f"--block-readouts: method {method.name!r} has no memory blocks to read out after")
    warm = False
    for question in questions:
        ex = question_example(served, question)
        prompt = method.prompt(ex, served.blocks)
        if not warm:  # one untimed run first: allocator, kernels, caches
            _generate(served, prompt)
            warm = True
        gen = _generate(served, prompt)
        text = tok.decode(gen.tokens[0], skip_special_tokens=True)
        ttft_ms, latency_ms = answer_times(tok, gen, method.cot)
        rec = {"question": question, "answer": served.task.extract_answer(text, cot=method.cot), "output": text,
               "ttft_ms": ttft_ms, "latency_ms": latency_ms}
        if method.any_block:
            rec["blocks"] = served.blocks
        if block_readouts:
            readouts = method.block_readouts(served.model, [ex], served.blocks, tok.pad_token_id, tok.eos_token_id,
                                             served.max_new_tokens, batch_size=1)[0]
            rec["block_readouts"] = [served.task.extract_answer(tok.decode(t, skip_special_tokens=True))
                                     for t in readouts]
        yield rec


def read_questions(lines: Iterable[str], source: str = "input") -> Iterator[str]:
    """Questions, one a line: plain text, or a JSON object with a ``question`` field (e.g. a task's JSONL file);
    blank lines are skipped. ``source`` names the file in errors."""
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = json.loads(line)["question"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConfigError(f"{source}, line {n}: a JSON line needs a 'question' field ({err})") from None
            if not isinstance(line, str) or not line.strip():
                raise ConfigError(f"{source}, line {n}: 'question' must be non-empty text, not {line!r}")
        yield line


def prompt_suffix(served: Served) -> list[int]:
    """Token ids the method appends to the question (RiM: K blocks; pause: the pauses; CoT-style: none), or an
    error for a method whose inference is more than a prompt."""
    method = served.method
    why = method.plain_decoding()
    if why is not None:
        raise ConfigError(f"method {method.name!r} cannot be exported as a plain checkpoint: its inference is not a "
                          f"prompt suffix ({why}); serve it with `rim answer`")
    ex = question_example(served, "")
    prompt = method.prompt(ex, served.blocks)
    if prompt[:len(ex.question)] != ex.question:
        raise ConfigError(f"method {method.name!r}: its prompt does not start with the question")
    return prompt[len(ex.question):]


def suffix_text(tokenizer, ids: list[int]) -> str:
    """The suffix as text that tokenizes back to exactly ``ids`` (its tokens are the method's added tokens)."""
    text = "".join(tokenizer.convert_ids_to_tokens(ids))
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        raise ValueError(f"the prompt suffix {text!r} does not tokenize back to its ids {ids}")
    return text


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str = "checkpoint", blocks: int | None = None,
               max_new_tokens: int | None = None) -> Path:
    """Write ``out``: merged weights (safetensors), tokenizer with the method's tokens, a greedy
    ``generation_config.json``, ``rim.json`` (the prompt suffix and where it came from) and a model card."""
    from transformers import GenerationConfig

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is {'not empty' if out.is_dir() else 'a file'}; export into a new folder")
    served = open_run(run_dir, checkpoint, "cpu", blocks, max_new_tokens)
    suffix = prompt_suffix(served)
    tok, model = served.tokenizer, served.model
    text = suffix_text(tok, suffix) if suffix else ""
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=served.max_new_tokens,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # a new folder of its own, renamed at the end
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # as a folder made the usual way (mkdtemp makes it private)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg = served.cfg
        meta = {"method": served.method.name, "prompt_format": cfg.data.prompt_format, "prompt_suffix": text,
                "prompt_suffix_ids": suffix, "blocks": served.blocks if served.method.any_block else None,
                "memory_tokens": cfg.method.memory_tokens if served.method.any_block else None,
                # room for text reasoning in the answer budget (0 unless CoT-style): a harness scoring another
                # task allows that task's budget plus this, as `rim eval --task` does (rim.integrations.lmeval)
                "reasoning_tokens": training_reasoning(cfg, served.task, served.method, tok),
                "base_model": cfg.model.name, "task": cfg.data.task, "run": str(run_dir), "checkpoint": checkpoint}
        (tmp / "rim.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(served, meta, Path(run_dir)), encoding="utf-8")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def training_summary(run_dir: Path) -> dict:
    """The last ``setup`` event of the run's metrics.jsonl (its number of training examples), or {}."""
    return RunDir(run_dir).last_event("setup")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def results_table(run_dir: Path) -> str:
    """Markdown table of every ``eval*/results.json`` of the run (single evaluations and the split protocol)."""
    rows = []
    for name, r in RunDir(run_dir).all_results():
        where = f"{r.get('task')} / {r.get('split')}"
        if "mean" in r:  # rim eval --protocol splits
            acc = f"{_pct(r['mean'])} +- {_pct(r['se'])} (mean +- SE, {r['n_splits']} splits)"
            rows.append(f"| {name} | {where} | protocol | {r['score_size']} | - | {acc} | - | - | - |")
        else:
            rows.append(f"| {name} | {where} | {r.get('checkpoint')} | {r['n']} | {r.get('blocks') or '-'} "
                        f"| {_pct(r['final_block_accuracy'])} | {_pct(r.get('any_block_accuracy'))} "
                        f"| {_ms(r.get('ttft_ms'))} | {r.get('device', '-')} |")
    if not rows:
        return "No `rim eval` results were found in the run directory when this model was exported.\n"
    head = ["| evaluation | task / split | checkpoint | n | K | final-block acc. % | any-block acc. % | TTFT ms "
            "| device |", "|---|---|---|---|---|---|---|---|---|"]
    note = ("TTFT: median time to the first answer token at batch 1, in `rim eval`'s own greedy decoder on the device "
            "named. Any-block accuracy is an oracle (it knows which block's readout is right); deploy on final-block "
            "accuracy.")
    return "\n".join(head + rows) + "\n\n" + note + "\n"


def trained_blocks(cfg: Config) -> int:
    """The K the final refinement stage trained with (a stage may set its own ``blocks``)."""
    return next((s.blocks or cfg.method.blocks for s in reversed(cfg.stages) if s.kind == "refinement"),
                cfg.method.blocks)


def model_card(served: Served, meta: dict, run_dir: Path) -> str:
    """README.md of an exported model: method, prompt suffix, training data, measured results, usage."""
    cfg, method = served.cfg, served.method
    setup = training_summary(run_dir)
    examples = setup.get("train_examples", "unknown")
    title = TITLES.get(method.name, method.name)
    base = f"`{cfg.model.name}`"
    if cfg.model.name == "tiny":
        m = cfg.model
        base += f" (a {m.tiny_family}-shaped model, {m.tiny_layers} layers, d = {m.tiny_hidden}, trained from scratch)"
    if cfg.data.prompt_format == "chat":
        question = ("tok(tok.apply_chat_template([{\"role\": \"user\", \"content\": question}], tokenize=False, "
                    "add_generation_prompt=True), add_special_tokens=False).input_ids")
        prompt_rule = ("the question as one user turn of the tokenizer's chat template with the assistant prompt "
                       "(tokenized without added special tokens), then the suffix")
    else:
        question = "tok(question, split_special_tokens=True).input_ids"
        prompt_rule = ("the question tokenized as usual (with the tokenizer's own special tokens, e.g. BOS), then "
                       "the suffix")
    lines = [
        "---", "library_name: transformers", "tags: [rim, reasoning-in-memory]", "---", "",
        f"# {title.split(':')[0]} model, exported by rim", "",
        f"**Method**: {title}.", "",
        "## Prompt", "",
        f"Prompt = {prompt_rule}. Greedy decoding (`generation_config.json`: `do_sample=False`, "
        f"`max_new_tokens={served.max_new_tokens}`) continues with the answer"
        + (", after the reasoning and `####`" if method.cot else "") + ".", "",
    ]
    if meta["prompt_suffix_ids"]:
        lines += [f"- suffix text: `{meta['prompt_suffix']}`",
                  f"- suffix token ids: `{meta['prompt_suffix_ids']}`"]
    else:
        lines += ["- suffix: none (the answer follows the question)"]
    if method.any_block:
        block = "".join(served.tokenizer.convert_ids_to_tokens(method.block))
        lines += [f"- K = {served.blocks} memory blocks of M = {cfg.method.memory_tokens} memory tokens; one block is "
                  f"`{block}` (ids `{method.block}`). K may be changed at inference: repeat the block K times "
                  f"(trained with K = {trained_blocks(cfg)})."]
    lines += [
        "", "The suffix text tokenizes to exactly the suffix ids with this tokenizer; appending the ids to the "
        "question's ids is the safest form. `rim.json` holds the same in machine-readable form. A special "
        "token's text inside a question (HTML's `<b>` is also a memory token) is text: rim tokenizes the question "
        "with `split_special_tokens=True`" + (", and the chat template's markers around it as usual"
                                              if cfg.data.prompt_format == "chat" else "") + ".", "",
        "## Use with transformers", "", "```python", "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        "path = \"PATH/TO/THIS/FOLDER\"",
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        f"SUFFIX = {meta['prompt_suffix_ids']}",
        "question = \"...\"",
        f"ids = torch.tensor([{question} + SUFFIX])",
        "out = model.generate(ids, attention_mask=torch.ones_like(ids))  # greedy, from generation_config.json",
        "text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)",
        ("answer = text.rsplit(\"####\", 1)[1].strip() if \"####\" in text else \"\""  # as rim answer
         if method.cot else "answer = text.strip()"),
        "```", "",
        "Any engine that takes a prompt as token ids (or as text with added tokens split out) and decodes greedily "
        "runs this model the same way; no custom attention mask or code is needed at inference.", "",
        "## Training", "",
        f"- base model: {base}, {cfg.model.train_mode} fine-tuning"
        + (" (LoRA merged into the weights)" if cfg.model.train_mode == "lora" else ""),
        f"- data: task `{cfg.data.task}`, split `{cfg.data.train_split}`, {examples} training examples"
        + (f", options `{json.dumps(cfg.data.options)}`" if cfg.data.options else ""),
        "- stages: " + "; ".join(f"{s.name} ({s.kind}, " + (f"{s.steps} steps" if s.steps else f"{s.epochs} epochs")
                                 + f", lr {s.lr})" for s in cfg.stages),
        f"- exported from `{run_dir}` (`{meta['checkpoint']}`)", "",
        "## Results (measured by `rim eval` on the run)", "",
        results_table(run_dir),
    ]
    return "\n".join(lines)
