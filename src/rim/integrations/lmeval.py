"""lm-evaluation-harness plugin: an exported rim model as lm-eval's model ``rim``, and rim's tasks as lm-eval
tasks scored by rim's own answer extraction and correctness.

    rim lm-eval OUT --tasks rim_gsm8k                 # OUT: a folder written by `rim export`
    # the same without rim's command (lm-eval's plugin discovery; see docs/serving.md):
    lm-eval run --model rim --model_args pretrained=OUT --include_path "$(rim lm-eval --tasks-dir)" --tasks rim_gsm8k

- The model (``RimLM``) reads the question lm-eval gives it (the task's ``doc_to_text``, the question alone) and
  builds the prompt with rim's rule from the export's ``rim.json``: the question in the run's prompt format (plain,
  or one chat turn with the assistant prompt), then the suffix (RiM: K memory blocks). It decodes greedily with
  transformers' ``generate`` to EOS or the answer budget, as ``rim eval`` does.
- The tasks (``lmeval_tasks/*.yaml``) load their problems through rim's task loaders (``rim_dataset``), so they
  read the same local files (``RIM_DATA_DIR`` or ``--metadata data_dir=...``) and give the same problems in the
  same order as ``rim eval``; ``rim_results`` scores a generation with the task's ``extract_answer`` and
  ``is_correct``. The metric is ``exact_match``: rim's correctness (numeric equality for the math benchmarks).
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from rim.config import ConfigError
from rim.data.tasks import Task, make_task
from rim.integrations.exported import PromptRule, read_meta

TASKS_DIR = Path(__file__).with_name("lmeval_tasks")
log = logging.getLogger(__name__)


@register_model("rim")
class RimLM(LM):
    """An exported rim model in lm-eval (``--model rim --model_args pretrained=OUT[,blocks=K]``).

    ``blocks``: K at inference (default: the exported K; methods with memory blocks only). ``max_gen_toks``: a
    fixed answer budget for every request (default: rim's, see ``budget``). Generation only: the log-likelihood
    request types are refused, since a rim model's answer is read after its suffix, not scored in place.
    """

    def __init__(self, pretrained: str, blocks: int | None = None, batch_size: int | str = 1,
                 device: str | None = None, max_gen_toks: int | None = None, **unused) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        unused.pop("max_batch_size", None)  # lm-eval passes it to every model; batches here are fixed
        if unused:
            raise ConfigError(f"--model_args: unknown argument {sorted(unused)[0]!r} for model 'rim' (takes "
                              "pretrained, blocks, batch_size, device, max_gen_toks)")
        self.meta = read_meta(pretrained)
        self.rule = PromptRule.from_meta(self.meta)
        self.blocks = None if blocks is None else int(blocks)
        self.rule.suffix(self.blocks)  # a K for a method without blocks fails here, not at the first request
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, padding_side="left")
        self._device = pick_device(device)
        self.model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).to(self._device).eval()
        self.default_budget = GenerationConfig.from_pretrained(pretrained).max_new_tokens
        self.max_gen_toks = None if max_gen_toks is None else int(max_gen_toks)
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)

    def prompt(self, question: str) -> list[int]:
        """Token ids to decode after: rim's prompt rule applied to the question."""
        return self.rule.prompt(self.tokenizer, question, self.blocks)

    def budget(self, doc: dict, gen_kwargs: dict) -> int:
        """Tokens to generate: ``max_gen_toks`` if set; for a rim task, what ``rim eval`` allows on it (the task's
        answer budget, plus the reasoning room the run had for methods that reason in text); else the task's
        ``max_gen_toks``, else the export's ``generation_config.json``."""
        if self.max_gen_toks is not None:
            return self.max_gen_toks
        if "rim_max_new_tokens" in doc and "reasoning_tokens" in self.meta:
            return int(doc["rim_max_new_tokens"]) + int(self.meta["reasoning_tokens"])
        return int(gen_kwargs.get("max_gen_toks", self.default_budget))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, ``batch_size`` prompts at a time (left-padded), cut at the task's ``until``."""
        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0) > 0:
                raise ConfigError("model 'rim' decodes greedily, as rim does; drop do_sample / temperature")
            jobs.append((self.prompt(context), self.budget(req.doc or {}, gen_kwargs), gen_kwargs.get("until") or []))
        out = [""] * len(jobs)
        # batches of one budget each; longest prompts first, so padding stays small
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i][1], -len(jobs[i][0])))
        for lo in range(0, len(order), self.batch_size):
            batch = order[lo:lo + self.batch_size]
            groups: dict[int, list[int]] = {}
            for i in batch:
                groups.setdefault(jobs[i][1], []).append(i)
            for budget, idx in groups.items():
                texts = self.decode([jobs[i][0] for i in idx], budget)
                for i, text in zip(idx, texts):
                    out[i] = cut(text, jobs[i][2])
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def decode(self, prompts: list[list[int]], budget: int) -> list[str]:
        """Greedy text after each prompt (to EOS or ``budget`` tokens), special tokens dropped, as ``rim eval``."""
        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=self._device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self._device)
        with torch.no_grad():
            gen = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=budget,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return tok.batch_decode(gen[:, width:], skip_special_tokens=True)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(LOGLIKELIHOOD)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(LOGLIKELIHOOD)

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        raise ConfigError("model 'rim' builds its prompt with the export's own rule (rim.json prompt_format: "
                          f"{self.meta['prompt_format']!r}); drop --apply_chat_template")

    @property
    def tokenizer_name(self) -> str:
        return str(self.meta.get("run", "rim"))


LOGLIKELIHOOD = ("model 'rim' supports generation tasks only (output_type: generate_until): a rim model answers "
                 "after its prompt suffix, so scoring a continuation in place is not what it was trained for")


def pick_device(name: str | None) -> torch.device:
    """The device asked for; lm-eval's default ``cuda:0`` falls back to the CPU where there is no CUDA."""
    if name in (None, "auto") or (str(name).startswith("cuda") and not torch.cuda.is_available()):
        if name not in (None, "auto"):
            log.warning("model 'rim': %s asked for, but CUDA is not available; using the CPU", name)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cut(text: str, until: list[str]) -> str:
    """``text`` up to the first of the stop strings ``until`` (lm-eval's generation contract)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


# --- tasks ---------------------------------------------------------------------------------------------------------

def rim_dataset(rim_task: str, rim_split: str = "test", rim_options: dict | None = None, data_dir: str | None = None,
                pretrained: str | None = None, cot: bool | str | None = None, **_metadata) -> dict:
    """lm-eval's ``custom_dataset``: the problems of a rim task's split, through rim's own loader, as
    ``{split: datasets.Dataset}`` of ``question``, ``answer`` and what scoring needs.

    lm-eval calls it with the task YAML's ``dataset_kwargs`` (``rim_task``, ``rim_split``, ``rim_options``) and
    its metadata, which holds the ``--model_args``: from ``pretrained`` (an exported folder) it learns whether the
    model answers after reasoning and ``####`` (``cot``, which ``--metadata cot=true`` may also set for a model
    that is not a rim export). ``data_dir``: the data folder (default ``RIM_DATA_DIR``).
    """
    from datasets import Dataset

    options = dict(rim_options or {})
    if data_dir is not None:
        options["data_dir"] = data_dir
    task = make_task(rim_task, options)
    if cot is None:
        cot = _export_cot(pretrained)
    elif isinstance(cot, str):
        cot = cot.lower() in ("1", "true", "yes")
    rows = [{"question": ex.question, "answer": ex.answer, "rim_task": rim_task, "rim_options": json.dumps(options),
             "rim_cot": bool(cot), "rim_max_new_tokens": task.max_new_tokens} for ex in task.load(rim_split)]
    return {rim_split: Dataset.from_list(rows)}


def _export_cot(pretrained: str | None) -> bool:
    """Whether an exported model answers after its reasoning (CoT-style methods); False for anything else."""
    if pretrained is None or not (Path(pretrained) / "rim.json").is_file():
        return False
    from rim.methods.base import method_class

    return method_class(read_meta(pretrained)["method"]).cot


@cache
def _task(name: str, options: str) -> Task:
    return make_task(name, json.loads(options))


def rim_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's ``process_results``: ``exact_match`` 1/0 by the task's own ``extract_answer`` (after the last
    ``####`` for CoT-style models) and ``is_correct``, as ``rim eval`` scores a prediction."""
    task = _task(doc["rim_task"], doc["rim_options"])
    prediction = task.extract_answer(results[0], cot=doc["rim_cot"])
    return {"exact_match": float(task.is_correct(prediction, doc["answer"]))}


def tasks_dir() -> Path:
    """The folder of rim's task YAMLs, for lm-eval's ``--include_path``."""
    return TASKS_DIR


def run(export: str | None, lm_eval_args: list[str]) -> None:
    """``rim lm-eval``: lm-eval's own command line (``lm-eval run ...``) with this plugin loaded, rim's tasks on the
    include path and, given ``export``, ``--model rim --model_args pretrained=EXPORT`` filled in (other
    ``--model_args`` are added to it)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    args = list(lm_eval_args)
    if "--include_path" in args:  # lm-eval takes one include path; a task YAML of your own can go to --tasks
        raise ConfigError("rim lm-eval puts rim's tasks on --include_path itself; pass your own task YAML files "
                          "to --tasks instead")
    if export is not None:
        if "--model" not in args:
            args += ["--model", "rim"]
        if "--model_args" in args:
            i = args.index("--model_args") + 1
            args[i] = f"pretrained={export}," + args[i]
        else:
            args += ["--model_args", f"pretrained={export}"]
    argv = sys.argv
    sys.argv = ["lm-eval", "run", *args, "--include_path", str(TASKS_DIR)]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
