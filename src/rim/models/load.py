"""Build the model and tokenizer a config names, with memory tokens added and the mask capability checked; load
a trained checkpoint's model and tokenizer back."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rim.config import METHOD_FACTS, Config, ModelConfig, load_config
from rim.data.tasks import Task, make_task
from rim.errors import CheckpointError
from rim.models.adapter import MEMORY_TOKENS, add_tokens, check_custom_mask_support, ensure_pad_token


def load_base(cfg: ModelConfig, task: Task | None = None, seed: int = 0) -> tuple[nn.Module, object]:
    """The pretrained (or, for ``tiny``, freshly initialised from ``seed``) model and its tokenizer, in float32."""
    from transformers import AutoModelForCausalLM

    if cfg.init_from is not None:
        return load_trained(cfg.init_from)
    tokenizer = base_tokenizer(cfg, task)
    if cfg.name == "tiny":
        from rim.models.tiny import tiny_model

        model = tiny_model(len(tokenizer), cfg.tiny_family, cfg.tiny_layers, cfg.tiny_hidden, cfg.tiny_heads,
                           attn_implementation=cfg.attn_implementation, seed=seed)
        return model, tokenizer
    from rim.models.hub import resolve_model_path

    path = resolve_model_path(cfg.name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=cfg.attn_implementation,
                                                 trust_remote_code=cfg.trust_remote_code)
    return model, tokenizer


def base_tokenizer(cfg: ModelConfig, task: Task | None = None):
    """The tokenizer of the base model: for ``tiny`` the word tokenizer of the task's vocabulary, else the model's
    own (before any special tokens are added)."""
    if cfg.name == "tiny":
        from rim.models.tiny import word_tokenizer

        if task is None:
            raise ValueError("model.name=tiny builds its tokenizer from the task's vocabulary; no task given")
        return word_tokenizer(task.vocabulary())
    from transformers import AutoTokenizer

    from rim.models.hub import resolve_model_path

    path = resolve_model_path(cfg.name)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)


def load_trained(run_dir: str) -> tuple[nn.Module, object]:
    """The final weights of a finished run (LoRA merged into the base) and its tokenizer, to train further."""
    from rim.rundir import RunDir

    run = RunDir(run_dir)
    cfg = load_config(run.config_path)
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    model, tokenizer = load_checkpoint(run.checkpoint(), cfg, task)
    model = model.to("cpu").eval()
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


def load_checkpoint(folder: str | Path, cfg: Config, task: Task) -> tuple[nn.Module, object]:
    """A trained checkpoint's model (float32, as trained: every weight, or the peft adapter over the base model of
    ``cfg.model`` with the method's tokens added again) and its tokenizer (with a pad token)."""
    return checkpoint_model(folder, cfg, task), checkpoint_tokenizer(folder, cfg)


def checkpoint_tokenizer(folder: str | Path, cfg: Config) -> object:
    """A trained checkpoint's tokenizer, with a pad token."""
    from transformers import AutoTokenizer

    # as in training: a checkpoint's own code runs only if the user said so
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


def checkpoint_model(folder: str | Path, cfg: Config, task: Task,
                     extend: Callable[[nn.Module], list[str]] | None = None) -> nn.Module:
    """A trained checkpoint's model (float32, as trained: every weight, or the peft adapter over the base model of
    ``cfg.model`` with the method's tokens added again). ``extend``: the method's ``extend_model``, which adds its
    own modules (CODI's projection) to the model before their weights load."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    remote = cfg.model.trust_remote_code
    if cfg.model.train_mode == "full":
        with quiet_load_report() if extend is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote,
                                                         attn_implementation=cfg.model.attn_implementation)
        if extend is not None:
            load_own_modules(model, extend(model), folder)
        return model
    from peft import PeftModel

    base, base_tokenizer = load_base(cfg.model, task)
    add_tokens(base_tokenizer, base, METHOD_FACTS[cfg.method.name].special_tokens)  # as in training
    if extend is not None:
        extend(base)  # the method's own modules (CODI's projection), which peft loads as modules_to_save
    return PeftModel.from_pretrained(base, folder)


@contextlib.contextmanager
def quiet_load_report():
    """Within the block, transformers does not warn about weights the model lacks (a method's own modules, which
    ``load_own_modules`` loads)."""
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)


def load_own_modules(model: nn.Module, names: list[str], ckpt: Path) -> None:
    """Load the weights of a method's own modules (``Method.extend_model``; Hugging Face's ``from_pretrained`` drops
    them as unknown) from a full-mode checkpoint's safetensors."""
    if not names:
        return
    from safetensors.torch import load_file

    weights = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}
    for name in names:
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        if not own:
            raise CheckpointError(f"{ckpt}: no weights of {name} (the method's own module) in the checkpoint")
        getattr(model, name).load_state_dict(own)
