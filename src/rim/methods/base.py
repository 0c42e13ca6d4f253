"""RiM, CoT and No-CoT as plug-ins: each says how an example is laid out for training and prompted at inference.

Everything else (data, model, loop, loss, decoding, metrics) is shared, so a comparison differs only in what the
methods are meant to differ in. A new method is a subclass with ``train_layout`` and ``prompt``, added to METHODS.
"""

from __future__ import annotations

from dataclasses import dataclass

from rim.config import MethodConfig, StageConfig
from rim.core.layout import Layout, Readout, build_layout, grounding_readouts, inference_prompt, refinement_readouts
from rim.data.tasks import Example, Task


@dataclass
class TokenizedExample:
    """Token ids of one example's parts, as each method needs them."""

    example: Example
    question: list[int]
    steps: list[list[int]]
    answer: list[int]
    cot: list[int]


def question_ids(tokenizer, question: str, prompt_format: str = "plain") -> list[int]:
    """Token ids of the question: ``plain`` with the tokenizer's own special tokens (e.g. BOS), or ``chat`` as one
    user turn of the tokenizer's chat template followed by the assistant prompt (the blocks and answer follow)."""
    if prompt_format == "plain":
        return tokenizer(question)["input_ids"]
    if prompt_format != "chat":
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose plain or chat")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.prompt_format=chat but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_example(task: Task, tokenizer, ex: Example, prompt_format: str = "plain") -> TokenizedExample:
    """Tokenize question (see ``question_ids``), steps, answer and CoT text."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return TokenizedExample(
        example=ex,
        question=question_ids(tokenizer, ex.question, prompt_format),
        steps=[ids(task.step_text(s)) for s in ex.steps],
        answer=ids(task.answer_text(ex.answer)),
        cot=ids(task.cot_text(ex)),
    )


class Method:
    """Base plug-in. ``cot``: the answer is extracted from generated reasoning; ``any_block``: one readout per
    block exists at inference (any-block accuracy applies)."""

    name = "method"
    cot = False
    any_block = False

    def __init__(self, cfg: MethodConfig, block: list[int], eos_id: int):
        self.cfg, self.block, self.eos_id = cfg, block, eos_id

    def train_layout(self, ex: TokenizedExample, stage: StageConfig) -> Layout:
        raise NotImplementedError

    def prompt(self, ex: TokenizedExample, blocks: int) -> list[int]:
        """Inference prompt; ``blocks`` (K) matters only to methods with memory blocks."""
        return list(ex.question)


class NoCoT(Method):
    """Supervised fine-tuning on the answer right after the question."""

    name = "nocot"

    def train_layout(self, ex: TokenizedExample, stage: StageConfig) -> Layout:
        return build_layout(ex.question, [[]], [Readout(ex.answer)], self.eos_id)


class CoT(Method):
    """Supervised fine-tuning on the steps as text, then ``####`` and the answer."""

    name = "cot"
    cot = True

    def train_layout(self, ex: TokenizedExample, stage: StageConfig) -> Layout:
        return build_layout(ex.question, [[]], [Readout(ex.cot)], self.eos_id)


class RiM(Method):
    """Reasoning in Memory: memory blocks after the question; grounding then refinement layouts."""

    name = "rim"
    any_block = True

    def train_layout(self, ex: TokenizedExample, stage: StageConfig) -> Layout:
        if stage.kind == "grounding":
            readouts = grounding_readouts(ex.steps, ex.answer)
        elif stage.kind == "refinement":
            readouts = refinement_readouts(ex.answer, stage.blocks or self.cfg.blocks, len(ex.steps))
        else:
            raise ValueError(f"RiM has grounding and refinement stages, not {stage.kind!r}")
        return build_layout(ex.question, [self.block] * len(readouts), readouts, self.eos_id)

    def prompt(self, ex: TokenizedExample, blocks: int) -> list[int]:
        return inference_prompt(ex.question, self.block, blocks)


METHODS: dict[str, type[Method]] = {"rim": RiM, "cot": CoT, "nocot": NoCoT}


def make_method(cfg: MethodConfig, block: list[int], eos_id: int) -> Method:
    """The method plug-in named by ``cfg.name``."""
    if cfg.name not in METHODS:
        raise ValueError(f"unknown method {cfg.name!r}; choose from {sorted(METHODS)}")
    return METHODS[cfg.name](cfg, block, eos_id)
