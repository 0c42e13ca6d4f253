"""The method plug-in interface, and the registry of methods.

A method says how an example is tokenized and laid out for training, what the inference prompt is, and, only
where it needs to, how a batch is padded, run forward and decoded. Everything else (data, model, loop, loss,
metrics, checkpoints) is shared, so a comparison differs only in what the methods are meant to differ in. A new
method is one small module with a ``Method`` subclass decorated with ``@register``.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from rim.config import RL, DataConfig, MethodConfig, MethodFacts, StageConfig, declare_method
from rim.core.batch import collate
from rim.core.layout import Layout
from rim.data.records import DataError
from rim.data.tasks import COT_SEPARATOR, Example, Task
from rim.infer.generate import Generation, greedy_generate
from rim.models.adapter import masked_forward, token_ids


@dataclass
class TokenizedExample:
    """Token ids of one example's parts, as the methods need them; ``extra`` holds method-specific parts."""

    example: Example
    question: list[int]
    steps: list[list[int]]
    answer: list[int]
    cot: list[int]
    extra: dict = field(default_factory=dict)


def question_ids(tokenizer, question: str, prompt_format: str = "plain") -> list[int]:
    """Token ids of the question: ``plain`` with the tokenizer's own special tokens (e.g. BOS), or ``chat`` as one
    user turn of the tokenizer's chat template followed by the assistant prompt (the blocks and answer follow).

    The question is text: a special token's literal string inside it (HTML's ``<b>`` is RiM's block token) is
    tokenized as text, never as that token. Only the chat template's own markers are special tokens.
    """
    if prompt_format == "plain":
        return tokenizer(question, split_special_tokens=True)["input_ids"]
    if prompt_format != "chat":
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose plain or chat")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.prompt_format=chat but the tokenizer has no chat template")
    text = chat_prompt(tokenizer, question)
    if text_ids(tokenizer, question) == tokenizer(question, add_special_tokens=False)["input_ids"]:
        # no special token's string in the question: the whole prompt tokenized at once
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # the template around a marker gives its head and tail; the question between them is tokenized as text
    marked = chat_prompt(tokenizer, CHAT_MARKER)
    head, tail = marked.split(CHAT_MARKER, 1)
    if marked.count(CHAT_MARKER) != 1 or not (len(head) + len(tail) <= len(text) and text.startswith(head)
                                              and text.endswith(tail)):
        raise ValueError("the chat template does not place the question between a fixed head and tail; "
                         "use data.prompt_format=plain for questions that contain special-token strings")
    body = text[len(head):len(text) - len(tail)]
    return (tokenizer(head, add_special_tokens=False)["input_ids"] + text_ids(tokenizer, body)
            + tokenizer(tail, add_special_tokens=False)["input_ids"])


CHAT_MARKER = "\ue000question\ue000"  # private-use characters: in no real question, kept by any template


def chat_prompt(tokenizer, question: str) -> str:
    """The question as one user turn of the chat template, then the assistant prompt (text)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a piece of text inside a sequence (no BOS or other added tokens); special tokens' strings in
    it are text, not those tokens."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def tokenize_example(task: Task, tokenizer, ex: Example, prompt_format: str = "plain") -> TokenizedExample:
    """Tokenize question (see ``question_ids``), steps, answer and CoT text."""
    return TokenizedExample(
        example=ex,
        question=question_ids(tokenizer, ex.question, prompt_format),
        steps=[text_ids(tokenizer, task.step_text(s)) for s in ex.steps],
        answer=text_ids(tokenizer, task.answer_text(ex.answer)),
        cot=text_ids(tokenizer, task.cot_text(ex)),
    )


def split_cot(task: Task, tokenizer, ex: Example, steps: tuple[str, ...] | None = None) -> tuple[list[int], list[int]]:
    """The task's CoT text (of ``steps``, default all) as token ids of the reasoning and of the tail (``#### a``).

    The tail is always the full CoT's, whatever ``steps`` leaves: a task that joins steps with spaces would otherwise
    put a second space in front of ``####`` when no step is left, a token no other stage trains."""

    def parts(text: str) -> tuple[str, str]:
        cut = text.rfind(COT_SEPARATOR)
        cut = len(text[:cut].rstrip()) if cut >= 0 else len(text)
        return text[:cut], text[cut:]

    reasoning, tail = parts(task.cot_text(ex))
    if steps is not None:
        reasoning = parts(task.cot_text(Example(ex.question, steps, ex.answer)))[0]
    return text_ids(tokenizer, reasoning) if reasoning.strip() else [], text_ids(tokenizer, tail)


class Method:
    """Base plug-in.

    ``cot``: the answer is extracted after generated reasoning (``####``); ``any_block``: one readout per memory
    block exists at inference (any-block accuracy applies); ``special_tokens``: tokens added to the vocabulary
    (rows trained with the LoRA); ``stage_kinds``: the curriculum stage kinds it trains with; ``dynamic``: the
    layout changes during a stage (it is rebuilt for every batch from the stage position). ``cache`` and
    ``compile``: how ``generate`` decodes unless told otherwise (``greedy_generate``; set from ``eval.cache`` and
    ``eval.compile`` when a run is loaded). ``stage``: the curriculum stage whose format decoding follows, the
    run's last (its deployable form; ``at_stage``), for methods whose decoding depends on it; ``reasoning``: room
    for text reasoning in the budget, as the run's checkpoint recorded it (``training_reasoning``). Both are None
    outside a run.
    """

    name = "method"
    cot = False
    any_block = False
    dynamic = False
    special_tokens: tuple[str, ...] = ()
    stage_kinds: tuple[str, ...] = ("sft", RL)  # rl: for methods whose inference is a prompt + plain decoding
    cache = "dynamic"
    compile: bool | str = False
    stage: StageConfig | None = None
    reasoning: int | None = None

    def __init__(self, cfg: MethodConfig, tokenizer):
        self.cfg, self.eos_id = cfg, tokenizer.eos_token_id
        self.token = dict(zip(self.special_tokens, token_ids(tokenizer, self.special_tokens)))

    def at_stage(self, stage: StageConfig | None) -> None:
        """Decode in the format ``stage`` trains: rim sets the run's last stage when training starts (selection) and
        when a run loads (every checkpoint is scored in the form the run deploys)."""
        self.stage = stage

    def tokenize(self, task: Task, tokenizer, ex: Example, prompt_format: str = "plain") -> TokenizedExample:
        return tokenize_example(task, tokenizer, ex, prompt_format)

    def train_layout(self, ex: TokenizedExample, stage: StageConfig, epoch: float = 0.0,
                     rng: random.Random | None = None) -> Layout:
        """The example laid out for training in ``stage``; ``epoch`` (epochs into the stage) and ``rng`` matter
        only to dynamic methods."""
        raise NotImplementedError

    def extend_model(self, model) -> list[str]:
        """Add the method's own modules to ``model`` (the Hugging Face model, before LoRA wraps it; CODI's projection),
        unless it has them already; returns their names, which train in full and are saved with the checkpoint (peft's
        ``modules_to_save`` in LoRA mode). None by default."""
        return []

    def prepare_training(self, model, processes: int = 1) -> None:
        """Make what only training needs (SIM-CoT's auxiliary decoder) from ``model``, the unwrapped model on its
        device, before the first optimizer exists; ``processes``: how many train together."""

    def training_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters outside the model (they join the optimizer; never saved). None by default."""
        return []

    def loss(self, model, batch: dict[str, torch.Tensor], weights: torch.Tensor, supervised_logits: bool = True
             ) -> torch.Tensor | None:
        """The training loss of a batch where the method has its own (CODI's distillation, SIM-CoT's step decoding),
        else None: the weighted readout loss of ``forward``'s logits (``rim.train.loss.step_loss``). ``weights``: the
        per-token loss weights (B, L) of the batch's labels."""
        return None

    def plain_decoding(self) -> str | None:
        """None when inference is ``prompt`` + plain causal greedy decoding, so that any causal LM engine given the
        prompt answers alike (what ``rim export`` needs); else why not."""
        return None if type(self).generate is Method.generate else f"{self.name} decodes in its own way"

    def prompt(self, ex: TokenizedExample, blocks: int) -> list[int]:
        """Inference prompt; ``blocks`` (K) matters only to methods with memory blocks."""
        return list(ex.question)

    def collate(self, layouts: list[Layout], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
        """A training batch of ``layouts``, its length rounded up to a multiple of ``multiple``."""
        return collate(layouts, pad_id, multiple)

    def forward(self, model, batch: dict[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """Training logits of a collated batch: (B, L, V), or (N, V) at the flat positions ``keep`` only (training
        passes ``batch["supervised"]``); one pass under the layout's mask by default."""
        return masked_forward(model, batch, self.cfg.readout_sees_question, keep)

    def generate(self, model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                 use_cache: bool = True, cache: str | None = None, compile: bool | str | None = None) -> Generation:
        """Greedy answers to a batch of prompts; ``cache`` and ``compile`` default to the method's own."""
        return greedy_generate(model, prompts, pad_id, eos_id, max_new_tokens, use_cache,
                               **self.decoding(cache, compile))

    def decoding(self, cache: str | None = None, compile: bool | str | None = None) -> dict:
        """``greedy_generate``'s ``cache`` and ``compile``: the given ones, else the method's."""
        return {"cache": cache or self.cache, "compile": self.compile if compile is None else compile}

    def decode(self, model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
               batch_size: int) -> list[list[int]]:
        """Greedy answers (token ids) to any number of prompts, ``batch_size`` at a time."""
        return [tokens for lo in range(0, len(prompts), batch_size)
                for tokens in self.generate(model, prompts[lo:lo + batch_size], pad_id, eos_id, max_new_tokens).tokens]

    def block_readouts(self, model, examples: list[TokenizedExample], blocks: int, pad_id: int, eos_id: int,
                       max_new_tokens: int, batch_size: int) -> list[list[list[int]]]:
        """``out[i][k-1]``: the greedy answer to example i with k blocks, k = 1..K (K decodes by default)."""
        per_k = [self.decode(model, [self.prompt(ex, k) for ex in examples], pad_id, eos_id, max_new_tokens,
                             batch_size) for k in range(1, blocks + 1)]
        return [[per_k[k][i] for k in range(blocks)] for i in range(len(examples))]


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to configs as ``method.name: <cls.name>`` (its facts declared to
    the config, which checks a config against them without importing the method)."""
    declare_method(cls.name, MethodFacts(tuple(cls.stage_kinds), cls.any_block, cls.forward is not Method.forward,
                                         tuple(cls.special_tokens)))
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method called ``name``."""
    import rim.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def make_method(cfg: MethodConfig, tokenizer) -> Method:
    """The method plug-in named by ``cfg.name``, with its special tokens looked up in ``tokenizer``."""
    return method_class(cfg.name)(cfg, tokenizer)




def tokenize_training(method: Method, task: Task, tokenizer, examples: list[Example], data: DataConfig,
                      stages: list[StageConfig]) -> list[TokenizedExample]:
    """Tokenize training examples, held to ``data.max_length`` tokens (their longest layout over ``stages``).

    An example over the limit is dropped (``too_long: skip``, the default: nothing is trained on a cut answer) or
    loses its question's leading words until it fits (``truncate``: steps and answer, which carry the supervision,
    stay whole; one that does not fit with a single question word left is dropped). Drops are counted in
    ``task.records.skipped``, truncations in ``task.records.truncated``, and both are warned about.
    """
    out = [method.tokenize(task, tokenizer, ex, data.prompt_format) for ex in examples]
    if data.max_length is None:
        return out
    kept, dropped, truncated = [], [], 0
    for i, ex in enumerate(out):
        length = training_length(method, ex, stages)
        if length <= data.max_length:
            kept.append(ex)
            continue
        cut = None
        if data.too_long == "truncate":
            cut = truncate_question(method, task, tokenizer, ex, data.max_length, stages, data.prompt_format)
        if cut is None:
            dropped.append(f"example {i} ({length} tokens)")
        else:
            kept.append(cut)
            truncated += 1
    source = f"{data.train_split} split (data.max_length={data.max_length})"
    if dropped:
        task.records.skip(source, Counter({"too long": len(dropped)}), dropped[:3])
    if truncated:
        task.records.truncated[source] = truncated
        warnings.warn(f"{source}: cut the questions of {truncated} examples from the left to fit",
                      stacklevel=2)
    if not kept:
        raise DataError(f"{source}: every training example is longer than data.max_length", "too long")
    return kept


def stage_prompt(method: Method, ex: TokenizedExample, stage: StageConfig) -> list[int]:
    """The inference prompt an rl stage samples after: with the stage's ``blocks``, else ``method.blocks`` (K)."""
    return method.prompt(ex, stage.blocks or method.cfg.blocks)


def training_length(method: Method, ex: TokenizedExample, stages: list[StageConfig]) -> int:
    """Tokens of an example's longest training sequence over ``stages`` (a dynamic method's at the start of a
    stage, where it is longest; an rl stage's prompt, which its sampled completions follow)."""
    return max(len(stage_prompt(method, ex, stage)) if stage.kind == RL
               else len(method.train_layout(ex, stage)) for stage in stages)


def truncate_question(method: Method, task: Task, tokenizer, ex: TokenizedExample, max_length: int,
                      stages: list[StageConfig], prompt_format: str = "plain") -> TokenizedExample | None:
    """``ex`` retokenized with the fewest leading words of its question cut that fits ``max_length`` (binary
    search over the words), or None if even the last word alone is too long."""
    question = ex.example.question
    starts = [m.start() for m in re.finditer(r"\S+", question)]
    best, lo, hi = None, 1, len(starts) - 1  # cut before word lo..hi; cutting before word 0 cuts nothing
    while lo <= hi:
        mid = (lo + hi) // 2
        cut = method.tokenize(task, tokenizer, replace(ex.example, question=question[starts[mid]:]), prompt_format)
        if training_length(method, cut, stages) <= max_length:
            best, hi = cut, mid - 1
        else:
            lo = mid + 1
    return best
