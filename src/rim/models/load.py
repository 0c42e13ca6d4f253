"""Build the model and tokenizer a config names, with memory tokens added and the mask capability checked."""

from __future__ import annotations

import torch
from torch import nn

from rim.config import ModelConfig
from rim.data.tasks import Task
from rim.models.adapter import MEMORY_TOKENS, add_tokens, check_custom_mask_support, ensure_pad_token


def load_base(cfg: ModelConfig, task: Task | None = None, seed: int = 0) -> tuple[nn.Module, object]:
    """The pretrained (or, for ``tiny``, freshly initialised from ``seed``) model and its tokenizer, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.init_from is not None:
        return load_trained(cfg.init_from)
    if cfg.name == "tiny":
        from rim.models.tiny import tiny_model, word_tokenizer

        if task is None:
            raise ValueError("model.name=tiny builds its tokenizer from the task's vocabulary; no task given")
        tokenizer = word_tokenizer(task.vocabulary())
        model = tiny_model(len(tokenizer), cfg.tiny_family, cfg.tiny_layers, cfg.tiny_hidden, cfg.tiny_heads,
                           attn_implementation=cfg.attn_implementation, seed=seed)
        return model, tokenizer
    from rim.models.hub import resolve_model_path

    path = resolve_model_path(cfg.name)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=cfg.attn_implementation,
                                                 trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer


def load_trained(run_dir: str) -> tuple[nn.Module, object]:
    """The final weights of a finished run (LoRA merged into the base) and its tokenizer, to train further."""
    from rim.eval.run import load_run

    _, model, tokenizer, _, _ = load_run(run_dir, device="cpu")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.train(), tokenizer


def build_model(cfg: ModelConfig, task: Task | None = None, seed: int = 0, tokens: tuple[str, ...] = MEMORY_TOKENS
                ) -> tuple[nn.Module, object, list[int]]:
    """Base model + tokenizer with a pad token and the method's special ``tokens`` (ids returned), refused if its
    attention ignores custom masks."""
    model, tokenizer = load_base(cfg, task, seed)
    ensure_pad_token(tokenizer)
    ids = add_tokens(tokenizer, model, tokens)
    check_custom_mask_support(model)
    return model, tokenizer, ids
