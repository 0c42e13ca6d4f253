"""Tasks: each owns its data loading, readout text, answer extraction, correctness rule and answer length.

Built in:
- ``running-sum``: a synthetic multi-step task made by a generator (no files). The question is n digits, step t
  is the running sum of the first t digits modulo 10, the answer is the last one::

      question  "3 7 2 9"    steps  "3" "0" "2" "1"    answer "1"

  The answer depends on every digit at once (a parity-like function that a small model does not learn in one
  pass), while each step is one small addition: the kind of problem that step-by-step text solves.
- the paper's benchmarks from their files (``rim.data.benchmarks``): gsm8k, gsm-hard, svamp, multiarith,
  prosqa, prontoqa;
- ``jsonl``: your own data, one JSON object per line with ``question`` (str), ``steps`` (list of str) and
  ``answer`` (str); malformed lines fail with the file, line and reason.

Bad records (``rim.data.records``): every file loader reads through its task's ``records``, whose policy
(``data.on_error``, given to ``make_task``) stops at the first bad record (``strict``) or skips and counts them
(``skip``; ``task.records.skipped``).
"""

from __future__ import annotations

import inspect
import os
import random
import types
import typing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from rim.config import ConfigError, _check_type
from rim.data.records import DataError, Records, field, parse_json, string_list

COT_SEPARATOR = "####"


@dataclass(frozen=True)
class Example:
    """One problem: question text, reasoning steps (may be empty) and the gold answer."""

    question: str
    steps: tuple[str, ...]
    answer: str


class Task:
    """Base task: plain-text readouts, CoT as ``steps #### answer``, exact-match correctness."""

    name = "task"
    max_new_tokens = 16  # answer budget; methods that reason in text add the longest chain of thought trained on

    def load(self, split: str) -> list[Example]:
        raise NotImplementedError

    @cached_property
    def records(self) -> Records:
        """The policy for bad records (``strict`` unless ``make_task`` got ``on_error``) and what it skipped."""
        return Records()

    def vocabulary(self) -> list[str]:
        """Every whitespace-separated word of the task's texts (for a word-level tokenizer trained from scratch)."""
        words = {COT_SEPARATOR}
        for split in ("train", "valid", "test"):
            try:
                examples = self.load(split)
            except UnknownSplit:  # the task has no such split
                continue
            for ex in examples:
                words.update(" ".join((ex.question, ex.answer) + ex.steps).split())
        return sorted(words)

    def step_text(self, step: str) -> str:
        return " " + step

    def answer_text(self, answer: str) -> str:
        return " " + answer

    def cot_text(self, ex: Example) -> str:
        return " " + " ".join(ex.steps + (COT_SEPARATOR, ex.answer))

    def extract_answer(self, text: str, cot: bool = False) -> str:
        """The answer inside generated text: after the last ``####`` for CoT, the stripped text otherwise."""
        if cot:
            return text.rsplit(COT_SEPARATOR, 1)[1].strip() if COT_SEPARATOR in text else ""
        return text.strip()

    def is_correct(self, prediction: str, gold: str) -> bool:
        return prediction.strip() == gold.strip()


class RunningSum(Task):
    """Running sum modulo ``modulus`` of ``digits`` random digits; splits drawn from disjoint seeds."""

    name = "running-sum"
    max_new_tokens = 4

    def __init__(self, digits: int = 4, modulus: int = 10, n_train: int = 20000, n_test: int = 300,
                 n_valid: int = 300, seed: int = 0):
        self.digits, self.modulus, self.seed = digits, modulus, seed
        self.sizes = {"train": n_train, "valid": n_valid, "test": n_test}

    def make(self, rng: random.Random) -> Example:
        """Draw one problem."""
        xs = [rng.randrange(self.modulus) for _ in range(self.digits)]
        sums, total = [], 0
        for x in xs:
            total = (total + x) % self.modulus
            sums.append(str(total))
        return Example(" ".join(map(str, xs)), tuple(sums), sums[-1])

    def load(self, split: str) -> list[Example]:
        if split not in self.sizes:
            raise unknown_split(self.name, split, list(self.sizes))
        # test problems never appear in valid, and neither in train: drawn first and excluded from what follows
        test = self._draw("test", self.sizes["test"])
        held_out = {"test": test, "valid": self._draw("valid", self.sizes["valid"], {ex.question for ex in test})}
        if split != "train":
            return held_out[split]
        return self._draw("train", self.sizes["train"], {ex.question for exs in held_out.values() for ex in exs})

    def _draw(self, split: str, n: int, exclude: set[str] = frozenset()) -> list[Example]:
        if n and len(exclude) >= self.modulus ** self.digits:  # drawing would never end
            raise ConfigError(f"running-sum with data.options.digits={self.digits} and modulus={self.modulus} has "
                              f"{self.modulus ** self.digits} distinct questions, and the splits drawn before "
                              f"{split!r} take all of them; use more digits or smaller n_test / n_valid")
        rng = random.Random(f"{self.seed}-{split}")
        out: list[Example] = []
        while len(out) < n:
            ex = self.make(rng)
            if ex.question not in exclude:
                out.append(ex)
        return out

    def vocabulary(self) -> list[str]:
        """Every word the task's texts use (for a word-level tokenizer)."""
        return [str(d) for d in range(self.modulus)] + [COT_SEPARATOR]


def read_jsonl(path: str | Path, records: Records | None = None) -> list[Example]:
    """Read ``{"question", "steps", "answer"}`` lines; a malformed line raises DataError naming file and line (or is
    skipped and counted, under ``records``' policy)."""
    return (records or Records()).lines(path, _parse_record)


def _parse_record(line: str, where: str) -> Example:
    rec = parse_json(line, where)
    question = field(rec, "question", where)
    steps = string_list(field(rec, "steps", where, list), "steps", where)
    answer = field(rec, "answer", where, (str, int, float))
    return Example(question, tuple(steps), str(answer))


class JsonlTask(Task):
    """Your own data: one JSONL file per split (``files: {train: ..., test: ...}``)."""

    name = "jsonl"

    def __init__(self, files: dict[str, str], max_new_tokens: int = 16):
        self.files, self.max_new_tokens = files, max_new_tokens

    def load(self, split: str) -> list[Example]:
        if split not in self.files:
            raise UnknownSplit(f"task 'jsonl' has no file for split {split!r}; data.options.files has "
                              f"{', '.join(sorted(self.files))}")
        return read_jsonl(self.files[split], self.records)


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make your own task available to configs as ``data.task: <cls.name>``."""
    TASKS[cls.name] = cls
    return cls


def task_classes() -> dict[str, type[Task]]:
    """Every task a config may name (``data.task``): the built-in ones and those registered with ``register_task``."""
    from rim.data.benchmarks import BENCHMARKS
    from rim.data.gsm8k_aug import GSM8KAug
    from rim.data.multiplication import Multiplication

    return {"running-sum": RunningSum, "jsonl": JsonlTask, "multiplication": Multiplication, "gsm8k-aug": GSM8KAug,
            **BENCHMARKS, **TASKS}


def check_task_options(name: str, options: dict) -> dict:
    """``data.task`` and ``data.options`` against the task's constructor: a ConfigError naming the key for an
    unknown task, an unknown or missing option or one of the wrong type; returns the options (ints made floats
    where a float is wanted)."""
    tasks = task_classes()
    if name not in tasks:
        raise ConfigError(f"config key 'data.task' must be one of {', '.join(sorted(tasks))}, not {name!r}")
    params = dict(inspect.signature(tasks[name].__init__).parameters)
    params.pop("self", None)
    try:
        hints = typing.get_type_hints(tasks[name].__init__)
    except Exception:  # noqa: BLE001 - e.g. names imported only for type checkers: no types to check
        hints = {}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ConfigError(f"unknown config key 'data.options.{unknown[0]}'; task {name!r} takes "
                              f"{', '.join(params) or 'no options'}")
    missing = [k for k, p in params.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                  p.KEYWORD_ONLY)
               and k not in options]
    if missing:
        raise ConfigError(f"config key 'data.options.{missing[0]}' is required for task {name!r}")
    return {key: _check_type(value, hints[key], f"data.options.{key}")
            if key in hints and _yaml_typed(hints[key]) and not isinstance(value, os.PathLike) else value
            for key, value in options.items()}


def _yaml_typed(hint) -> bool:
    """Whether a type hint is made of the types YAML gives (the only ones checked; a Path, a Literal or a class
    of the task's own is left to its constructor)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return all(_yaml_typed(arg) for arg in typing.get_args(hint))
    return (typing.get_origin(hint) or hint) in (int, float, bool, str, dict, list, type(None))


def make_task(name: str, options: dict, on_error: str = "strict") -> Task:
    """Build a task by name from its options (``data.options`` in the config); ``on_error`` (``data.on_error``) is
    what its loaders do with a bad record: ``strict`` raises, ``skip`` drops and counts it (``task.records``)."""
    options = check_task_options(name, options)
    try:
        task = task_classes()[name](**options)
    except DataError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key 'data.options' of task {name!r}: {err}") from None
    task.records = Records(on_error)
    return task


class UnknownSplit(ConfigError):
    """A split the task does not have (named by ``data.*_split``, ``eval.select_split`` or ``--split``)."""


def unknown_split(task: str, split: str, splits: list[str]) -> UnknownSplit:
    return UnknownSplit(f"task {task!r} has splits {', '.join(splits)}, not {split!r} (data.train_split, "
                       "data.eval_split, eval.select_split or --split)")
