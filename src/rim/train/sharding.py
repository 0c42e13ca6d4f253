"""Fully sharded training (``train.fsdp: true``) through torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), for
models whose weights, gradients and optimizer state do not fit one GPU next to each other.

Each transformer block (the classes HF lists in ``_no_split_modules``) is one FSDP unit and the rest of the model
(embeddings, tied head, final norm) the root unit: a process holds 1/N of every weight, gathers a block's full
weights just before it runs and frees them after. Under bf16 the gathered weights and the compute are bf16 and
gradients are reduced in fp32 (``MixedPrecisionPolicy``); the sharded master weights and AdamW state stay fp32.

The same code runs on GPUs (NCCL) and on CPU processes (gloo), which is how the tests check it against one
process. Three things differ from data parallelism and are handled here:

- **saving**: weights and optimizer state are gathered into full, unsharded state dicts (a collective every
  process joins), so a checkpoint is the same files whatever the number of processes;
- **resume**: the full optimizer state is scattered back into the shards;
- **decoding**: every sharded forward is a collective, but evaluation shards problems over processes and stops
  each batch at its own EOS, so processes run different numbers of forwards. ``gathered`` unshards the whole
  model for the duration (inference needs no gradients or optimizer state, so full weights fit where training
  did) and every process then decodes on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rim.models.adapter import tied_names, transformer_blocks


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The model's FSDP units (empty for a model that is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def shard_model(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Shard ``model`` over every process of the default process group: each transformer block, then the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision not in ("no", "bf16"):
        raise ValueError(f"train.fsdp supports precision 'no' or 'bf16', not {precision!r}")
    blocks = transformer_blocks(model, "fsdp")
    mesh = init_device_mesh(device.type, (dist.get_world_size() if dist.is_initialized() else 1,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
              else MixedPrecisionPolicy())
    model.to(device)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, unsharded, on the CPU of the main process (empty elsewhere). A collective: call on every
    process. For a plain HF model a tied weight appears once, under its first name, as ``save_pretrained`` writes
    it; peft picks its adapter entries (tied ones included) out of the whole dict itself."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    weights = get_model_state_dict(model, options=_options())
    if hasattr(model, "peft_config"):
        return weights
    for name in tied_names(model):
        weights.pop(name, None)
    return weights


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state, unsharded and keyed by parameter name, on the main process. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Scatter a full optimizer state (from ``full_optimizer_state``; every process passes it) into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Within the block the model's weights are whole on every process, so forwards need no collectives and
    processes may run different numbers of them (sharded evaluation). Nothing happens for an unsharded model.
    On exit every unit reshards after forward again, except the root: FSDP2 keeps it whole after forward by
    default, since backward would gather it right back."""
    units = fsdp_modules(model)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)
