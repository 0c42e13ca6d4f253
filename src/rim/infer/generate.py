"""Inference: one prefill of the prompt (for RiM, ``question + K blocks``), then batched greedy decoding.

Prompts are left-padded so every sequence's next token sits in the last column; position ids count real tokens
only (a padded prompt gets the positions it would have alone), and each sequence stops at its own EOS.
With ``use_cache=False`` every step re-runs the whole sequence: the slow reference the tests compare against.

``cache="static"`` decodes into a preallocated KV cache (transformers' ``StaticCache``) and ``compile`` runs the
decoding steps through ``torch.compile``: fixed shapes at every step, which is what CUDA graphs need (mode
``reduce-overhead``, the default on a GPU). Both are off by default and meant for a GPU: on a CPU the static cache
measured slower (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rim.config import CACHES, ConfigError
from rim.models.adapter import compile_options
STATIC_CHUNK = 64  # static caches are sized in multiples of this, so batches of similar length share one


@dataclass
class Generation:
    """Generated token ids per prompt (EOS excluded), and wall-clock times in seconds since the call began."""

    tokens: list[list[int]]
    step_s: list[float]  # step_s[i]: when token i of the batch was known (step_s[0]: prefill + first token)
    total_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_argument(model: nn.Module) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and 0/1 attention mask, padded on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


_STATIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (shape key, its last StaticCache)


def static_length(length: int) -> int:
    """A static cache's length for ``length`` tokens: rounded up to a multiple of ``STATIC_CHUNK``, so that calls of
    nearby sizes share one cache (and one compiled graph)."""
    return -(-length // STATIC_CHUNK) * STATIC_CHUNK


def static_cache(model: nn.Module, batch: int, length: int, full_layers: bool = False):
    """A ``StaticCache`` for ``batch`` sequences of at least ``length`` tokens, reset; the model's previous one when
    it has that size, so that a compiled decoding step keeps its tensors (and CUDA graphs) from call to call.
    ``full_layers``: every layer keeps every column, also sliding-window ones (for custom 4-D masks, which span
    the whole cache and apply the windows themselves)."""
    import copy

    from transformers import StaticCache

    param = next(model.parameters())
    key = (batch, static_length(length), param.dtype, param.device, full_layers)
    if model in _STATIC and _STATIC[model][0] == key:
        cache = _STATIC[model][1]
        cache.reset()
        return cache
    config = model.config
    if full_layers:
        config = copy.copy(config.get_text_config())
        config.sliding_window = None
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = ["full_attention"] * len(config.layer_types)
    cache = StaticCache(config=config, max_cache_len=key[1])
    _STATIC[model] = key, cache
    return cache


@functools.cache
def _compiled(forward, how: str):
    return torch.compile(forward, **compile_options(how))


def decoding_forward(model: nn.Module, compile: bool | str):
    """The forward of the decoding steps: the model itself, or its class's forward compiled once per ``compile`` and
    shared by every call. ``True``: mode ``reduce-overhead`` (CUDA graphs) on a GPU, ``default`` elsewhere; a
    string: an inductor mode, or else a ``torch.compile`` backend (``eager``: tracing only, to check a model)."""
    if not compile:
        return model
    if compile is True:
        compile = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else "default"
    return functools.partial(_compiled(type(model).forward, compile), model)


def learned_positions(model: nn.Module) -> int | None:
    """How many positions a model with learned absolute position embeddings has (GPT-2's ``n_positions``), or
    None: an embedding table of ``max_position_embeddings`` rows beside the token embedding. Rotary models have
    none, and decode past that number as Hugging Face's ``generate`` lets them."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    tokens = model.get_input_embeddings()
    found = any(isinstance(m, nn.Embedding) and m is not tokens and m.num_embeddings == limit for m in model.modules())
    return limit if found else None


def check_positions(limit: int | None, needed: int) -> None:
    """A clear error before a forward pass would feed a position past a learned position table (it fails with an
    index error deep inside the model otherwise, and a device-side assert on a GPU)."""
    if limit is not None and needed > limit:
        raise ConfigError(f"decoding reached position {needed - 1} and the model has {limit} positions "
                          "(max_position_embeddings): use fewer blocks (--blocks), a shorter question or fewer new "
                          "tokens")


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                    use_cache: bool = True, latents: int = 0, after_latents: list[int] | None = None,
                    cache: str = "dynamic", compile: bool | str = False, hidden: list[int] | None = None,
                    project: Callable[[torch.Tensor], torch.Tensor] | None = None, temperature: float = 0.0
                    ) -> Generation:
    """Greedy-decode up to ``max_new_tokens`` after each prompt, in one batch (or, with ``temperature`` > 0, sample
    each token from softmax(logits / temperature), drawing from torch's default generator of the model's device: what
    the rl stage samples its completions with).

    ``latents`` > 0 (continuous thoughts, e.g. Coconut): after the prompt, that many positions take the previous
    position's last hidden state as their input embedding, then the ``after_latents`` tokens follow, and only then
    does decoding start (the time to the first token includes the thoughts). ``cache``: ``dynamic`` (grows each
    step) or ``static`` (preallocated for prompt + latent passes + ``max_new_tokens``); ``compile``: run the
    decoding steps through ``torch.compile`` (a mode name, or True for the device's default), static cache only.
    ``hidden``: per prompt, how many of its first tokens the generated tokens (and any latent passes) must not see;
    the prompt's own tokens still do (RiM's ``readout_sees_question: false``); needs the cache. ``project``: what a
    latent's hidden state passes through before it is fed back (CODI's projection); None: fed as it is.
    """
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r}; choose from {', '.join(CACHES)}")
    if cache == "static" and not use_cache:
        raise ValueError("cache='static' needs use_cache=True")
    if hidden is not None and not use_cache:
        raise ValueError("hidden prompt tokens need use_cache=True (without a cache the prompt is fed again)")
    if compile and cache != "static":
        raise ValueError("compile needs cache='static' (a dynamic cache changes shape every step: it would recompile)")
    device, limit = next(model.parameters()).device, learned_positions(model)  # (outside the timing)
    start = time.perf_counter()
    ids, mask = left_pad(prompts, pad_id, device)
    batch, length = ids.shape
    embedded = bool(latents or after_latents)  # latent methods feed embeddings throughout
    embed = model.get_input_embeddings() if embedded else None
    key = "inputs_embeds" if embedded else "input_ids"
    as_input = embed if embedded else (lambda x: x)  # token ids -> what the model is fed
    plan = ["latent"] * latents + (["after"] if after_latents else [])
    # every column ever fed (the last token is not); a static cache's mask spans the whole cache, whose unwritten
    # columns the causal mask hides
    width = length + latents + len(after_latents or []) + max(max_new_tokens - 1, 0)
    past = None
    if cache == "static":  # (not the cache's get_max_length(): sliding-window layers report their window)
        width = static_length(width)
        past = static_cache(model, batch, width)
    mask = torch.cat([mask, mask.new_ones(batch, width - length)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_mask = mask
    if hidden is not None:  # left padding: prompt i starts at column length - len(prompts[i])
        column = torch.arange(width, device=device)
        first = torch.tensor([length - len(p) for p in prompts], device=device)[:, None]
        seen_later = (column < first) | (column >= first + torch.tensor(hidden, device=device)[:, None])
        mask = mask * seen_later  # what everything after the prompt attends to
    decode = decoding_forward(model, compile)
    out_tokens = torch.full((batch, max_new_tokens), eos_id, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    fed, pending, step_s, cache_arg = None, as_input(ids), [], cache_argument(model)
    seen = 0  # columns fed so far
    while len(step_s) < max_new_tokens:
        inputs = pending if use_cache or fed is None else torch.cat([fed, pending], dim=1)
        end = seen + pending.shape[1]
        check_positions(limit, end)  # the longest prompt's last column fed has position end - 1
        forward = decode if fed is not None and not plan else model  # prefill and thoughts stay uncompiled
        step_mask = prompt_mask if fed is None else mask
        out = forward(attention_mask=step_mask if cache == "static" else step_mask[:, :end],
                      position_ids=positions[:, end - inputs.shape[1]:end], use_cache=use_cache,
                      output_hidden_states=bool(plan) and plan[0] == "latent", **{key: inputs, cache_arg: past})
        fed, seen = inputs, end
        if use_cache:
            past = out[cache_arg]
        if plan:
            if plan.pop(0) == "latent":
                pending = out.hidden_states[-1][:, -1:]
                pending = (pending if project is None else project(pending)).to(fed.dtype)
            else:
                pending = as_input(torch.tensor([after_latents] * batch, device=device))
        else:
            last = out.logits[:, -1]
            next_token = (torch.multinomial(torch.softmax(last.float() / temperature, dim=-1), 1)[:, 0]
                          if temperature > 0 else last.argmax(-1)).masked_fill(done, eos_id)  # (B,)
            out_tokens[:, len(step_s)] = next_token
            done |= next_token == eos_id
            finished = bool(done.all())  # one host sync per token: the price of stopping early
            step_s.append(time.perf_counter() - start)
            if finished:
                break
            pending = as_input(next_token[:, None])
    _sync(device)
    total_s = time.perf_counter() - start
    tokens = []
    for row in out_tokens.tolist():
        tokens.append(row[: row.index(eos_id)] if eos_id in row else row)
    return Generation(tokens, step_s, total_s)
