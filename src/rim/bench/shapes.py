"""The benchmarked model shapes, the settings of a bench run, and its synthetic problems."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rim.config import MethodConfig
from rim.data.tasks import Example
from rim.methods.base import METHODS, TokenizedExample
from rim.models.adapter import add_tokens
from rim.models.tiny import SPECIAL, tiny_model, word_tokenizer


@dataclass(frozen=True)
class Shape:
    """A causal LM shape, built locally with random weights and tied embeddings."""

    family: str  # llama or gpt2
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


SHAPES = {
    "tiny": Shape("llama", 8, 96, 4, 2, 384, 2048),  # the demo's model, with a vocabulary of 2,048
    # SmolLM2-135M's 30 layers at a tiny width: on a CPU much of a step is the host's, as all of SmolLM2's on a GPU
    "tiny-deep": Shape("llama", 30, 64, 4, 2, 256, 2048),
    "gpt2": Shape("gpt2", 12, 768, 12, 12, 3072, 50257),  # GPT-2 124M
    "smollm2-135m": Shape("llama", 30, 576, 9, 3, 1536, 49152),
    "llama-3.2-1b": Shape("llama", 16, 2048, 32, 8, 8192, 128256),
}

# tokens each method generates before its first answer token: CoT its reasoning (37 tokens, a GSM8K-Aug-like chain
# with its ``####``), Coconut the ``####`` after its thoughts; the others answer right after the prompt
REASONING_TOKENS = {"nocot": 0, "rim": 0, "pause": 0, "coconut": 1, "cot": 37}
NO_STOP = -1  # an EOS id no model produces: every method decodes exactly its budget
STATIC_METHODS = ("nocot", "rim")  # timed with a static KV cache too, when asked


@dataclass
class BenchSettings:
    """What is measured: the synthetic problem, batch sizes and how often."""

    question_tokens: int = 100
    steps: int = 4  # T, reasoning steps of the training examples (grounding layout)
    step_tokens: int = 8
    answer_tokens: int = 3  # decoded after any reasoning; the answer of the training examples
    blocks: int = 8  # K
    memory_tokens: int = 2  # M
    thoughts: int = 6  # Coconut's continuous thoughts (3 steps x 2)
    batch_sizes: tuple[int, ...] = (1, 64)  # latency
    static_cache: bool = False  # latency: also No-CoT and RiM decoded into a static KV cache (rows <method>_static)
    compile: bool | str = False  # ... and with compiled decoding steps, static cache (rows <method>_compiled)
    train_batch: int = 32
    train_mode: str = "auto"  # full for the tiny shapes, lora (rank 128) otherwise, as in rim train
    # also time RiM's and the plain training step through blocks torch.compile'd in these modes (or backends): rows
    # rim_compiled / plain_compiled ("default") and rim_compiled_<mode> / plain_compiled_<mode> (reduce-overhead:
    # CUDA graphs on a GPU); with the scope "decoder", the whole decoder compiled at once: rows rim_compiled_decoder..
    compile_train: tuple[str, ...] = ()
    compile_scopes: tuple[str, ...] = ("blocks",)
    # the compiled rows' batches are padded to a multiple of this (train.pad_to_multiple, which CUDA graphs need):
    # both stages then have one length, compiled once; their tokens/s count the unpadded tokens
    compile_pad: int = 16
    profile: bool = False  # train: also profile one more step of each row (where the time goes: host or device)
    warmup: int = 2
    repeats: int = 10
    seed: int = 0


def bench_tokens() -> tuple[str, ...]:
    """The special tokens of every method that is timed."""
    return tuple(dict.fromkeys(t for name in REASONING_TOKENS for t in METHODS[name].special_tokens))


def shape_model(shape: Shape, device: torch.device, seed: int = 0):
    """(model in fp32, tokenizer with every method's special tokens), the vocabulary exactly ``shape.vocab``: the
    library's tiny model builder (``rim.models.tiny``) at the shape's size."""
    tokens = bench_tokens()
    tokenizer = word_tokenizer([f"w{i}" for i in range(shape.vocab - len(SPECIAL) - len(tokens))])
    model = tiny_model(shape.vocab, shape.family, shape.layers, shape.hidden, shape.heads,
                       max_positions=1024 if shape.family == "gpt2" else 2048, seed=seed, kv_heads=shape.kv_heads,
                       ffn=shape.ffn, device=device)
    add_tokens(tokenizer, model, tokens)
    return model, tokenizer


def synthetic_examples(n: int, tokenizer, s: BenchSettings, seed: int = 0) -> list[TokenizedExample]:
    """``n`` problems of random word tokens: a question (BOS first), ``s.steps`` steps and an answer."""
    rng = random.Random(seed)
    words = range(len(SPECIAL), len(tokenizer) - len(bench_tokens()))

    def draw(k: int) -> list[int]:
        return [rng.choice(words) for _ in range(k)]

    return [TokenizedExample(Example("", (), ""), [tokenizer.bos_token_id] + draw(s.question_tokens - 1),
                             [draw(s.step_tokens) for _ in range(s.steps)], draw(s.answer_tokens), [])
            for _ in range(n)]


def method_config(name: str, s: BenchSettings) -> MethodConfig:
    return MethodConfig(name=name, blocks=s.blocks, memory_tokens=s.memory_tokens, thoughts_per_step=2,
                        max_latent_steps=s.thoughts // 2)
