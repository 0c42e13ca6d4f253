"""Inference: one prefill of the prompt (for RiM, ``question + K blocks``), then batched greedy decoding.

Prompts are left-padded so every sequence's next token sits in the last column; position ids count real tokens
only (a padded prompt gets the positions it would have alone), and each sequence stops at its own EOS.
With ``use_cache=False`` every step re-runs the whole sequence: the slow reference the tests compare against.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn


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


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                    use_cache: bool = True, latents: int = 0, after_latents: list[int] | None = None) -> Generation:
    """Greedy-decode up to ``max_new_tokens`` after each prompt, in one batch.

    ``latents`` > 0 (continuous thoughts, e.g. Coconut): after the prompt, that many positions take the previous
    position's last hidden state as their input embedding, then the ``after_latents`` tokens follow, and only then
    does decoding start (the time to the first token includes the thoughts).
    """
    device = next(model.parameters()).device
    start = time.perf_counter()
    ids, mask = left_pad(prompts, pad_id, device)
    batch = ids.shape[0]
    embedded = bool(latents or after_latents)  # latent methods feed embeddings throughout
    embed = model.get_input_embeddings() if embedded else None
    key = "inputs_embeds" if embedded else "input_ids"
    as_input = embed if embedded else (lambda x: x)  # token ids -> what the model is fed
    plan = ["latent"] * latents + (["after"] if after_latents else [])
    out_tokens = torch.full((batch, max_new_tokens), eos_id, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    past, fed, pending, step_s, cache_arg = None, None, as_input(ids), [], cache_argument(model)
    while len(step_s) < max_new_tokens:
        inputs = pending if use_cache or fed is None else torch.cat([fed, pending], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -inputs.shape[1]:]
        out = model(attention_mask=mask, position_ids=positions, use_cache=use_cache,
                    output_hidden_states=bool(plan) and plan[0] == "latent", **{key: inputs, cache_arg: past})
        fed = inputs
        if use_cache:
            past = out[cache_arg]
        if plan:
            if plan.pop(0) == "latent":
                pending = out.hidden_states[-1][:, -1:].to(fed.dtype)
            else:
                pending = as_input(torch.tensor([after_latents] * batch, device=device))
        else:
            next_token = out.logits[:, -1].argmax(-1).masked_fill(done, eos_id)  # (B,)
            out_tokens[:, len(step_s)] = next_token
            done |= next_token == eos_id
            finished = bool(done.all())  # one host sync per token: the price of stopping early
            step_s.append(time.perf_counter() - start)
            if finished:
                break
            pending = as_input(next_token[:, None])
        mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, pending.shape[1])], dim=1)
    _sync(device)
    total_s = time.perf_counter() - start
    tokens = []
    for row in out_tokens.tolist():
        tokens.append(row[: row.index(eos_id)] if eos_id in row else row)
    return Generation(tokens, step_s, total_s)
