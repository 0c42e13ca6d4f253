"""One thin adapter that makes any Hugging Face causal LM a RiM model, through generic HF APIs only.

- ``add_tokens``: a method's special tokens (RiM: ``<b> <m> </b>``), new embedding rows set to the mean row;
- ``check_custom_mask_support``: a probe that refuses attention backends which ignore custom 4-D masks;
- ``make_trainable``: LoRA (peft) plus only the new embedding rows, or every weight;
- ``masked_forward``: one forward pass under the RiM mask with RiM position ids;
- ``logits_at``: logits only at chosen positions (training computes them where labels are, not over the vocabulary
  at every position);
- ``loss_at`` / ``masked_loss``: the weighted readout loss fused with the LM head at those positions (no logits);
- ``compile_model``: ``torch.compile`` of each transformer block, or of the whole decoder stack at once.
No model family is special-cased: only ``get_input_embeddings``, ``get_output_embeddings``,
``resize_token_embeddings``, ``get_decoder``, ``attention_mask``, ``position_ids`` and ``_no_split_modules``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rim.config import COMPILE_MODES, COMPILE_SCOPES, MEMORY_TOKENS
from rim.core.fused_loss import fused_linear_cross_entropy
from rim.core.layout import memory_block
from rim.core.mask import additive_mask, attention_mask

MASK_IGNORING_BACKENDS = ("flash_attention_2", "flash_attention_3", "paged_attention", "kernels-community")


@dataclass(frozen=True)
class MemoryTokenIds:
    """Token ids of ``<b>``, ``<m>`` and ``</b>`` in a tokenizer."""

    begin: int
    memory: int
    end: int

    def block(self, m: int) -> list[int]:
        """Token ids of one memory block with M memory tokens."""
        return memory_block(self.begin, self.memory, self.end, m)

    @property
    def all(self) -> list[int]:
        return [self.begin, self.memory, self.end]


def memory_token_ids(tokenizer, tokens: tuple[str, str, str] = MEMORY_TOKENS) -> MemoryTokenIds:
    """Look up the memory tokens of a tokenizer that already has them (e.g. one saved in a run directory)."""
    return MemoryTokenIds(*token_ids(tokenizer, tokens))


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token its EOS as pad (padding is always masked out, so this is safe)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token; set one before training")
        tokenizer.pad_token = tokenizer.eos_token


def add_tokens(tokenizer, model: nn.Module, tokens: tuple[str, ...]) -> list[int]:
    """Add ``tokens`` as special tokens and grow the embeddings; new rows start at the mean embedding.

    Starting from the mean of the real token rows (not at random, and not from whatever spare rows a padded
    vocabulary holds) keeps the new tokens in the distribution the pretrained layers expect. A tokenizer that
    already has the tokens (one saved by ``rim train``) is left as it is, so trained rows are never reset; a model
    without rows for them (a base model beside such a tokenizer) gets them.
    Returns the tokens' ids.
    """
    if not tokens:
        return []
    rows = model.get_input_embeddings().weight.shape[0]
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)},
                                         replace_extra_special_tokens=False)
    ids = token_ids(tokenizer, tokens)
    if added == 0 and max(ids) < rows:  # tokenizer and model both know them
        return ids
    n_real = min(len(tokenizer) - added, rows)  # the rows of real tokens (a tokenizer may know the new ones already)
    if max(ids) >= rows:
        try:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        except (NotImplementedError, AttributeError) as err:
            raise ValueError(f"{type(model).__name__} cannot resize its token embeddings: {err}") from err
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None:
                emb.weight[ids] = emb.weight[:n_real].mean(dim=0)
    return ids


def token_ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    """Ids of special tokens a tokenizer already has (e.g. one saved in a run directory); an error otherwise."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"tokenizer lacks the special tokens {tokens}; was it saved by `rim train`?")
    return ids


def add_memory_tokens(tokenizer, model: nn.Module, tokens: tuple[str, str, str] = MEMORY_TOKENS) -> MemoryTokenIds:
    """``add_tokens`` for RiM's ``<b> <m> </b>``."""
    return MemoryTokenIds(*add_tokens(tokenizer, model, tokens))


def check_custom_mask_support(model: nn.Module) -> None:
    """Refuse a model whose attention ignores (or misreads) custom 4-D masks, with a message saying what to do.

    Two probes on a 4-token input: our additive causal mask must give the logits of the model's own causal mask,
    and hiding token 1 from the last token must change its logits.
    """
    backend = getattr(model.config, "_attn_implementation", None)
    hint = "load the model with attn_implementation='sdpa' or 'eager'"
    if backend in MASK_IGNORING_BACKENDS:
        raise ValueError(f"attention backend {backend!r} ignores RiM's custom attention mask; {hint}")
    other = set(getattr(model.config.get_text_config(), "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES)
    if other:
        raise ValueError(f"{type(model).__name__} has layers of type {', '.join(sorted(other))}, which an attention "
                         f"mask does not fully steer; RiM needs {' or '.join(ATTENTION_LAYER_TYPES)} layers only")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.tensor([[1, 2, 3, 4]], device=device) % model.get_input_embeddings().weight.shape[0]
        seg = torch.zeros_like(ids)
        causal = attention_mask(seg, seg)  # all-question sequence: plain causal
        hidden = causal.clone()
        hidden[0, 3, 1] = False
        positions = torch.arange(4, device=device)[None]
        with torch.no_grad():
            plain = model(input_ids=ids).logits[0, -1].float()
            ours = model(input_ids=ids, attention_mask=model_mask(causal, model, positions)).logits[0, -1].float()
            blocked = model(input_ids=ids, attention_mask=model_mask(hidden, model, positions)).logits[0, -1].float()
    finally:
        model.train(was_training)
    tol = 1e-3 * plain.abs().max().item() + 1e-5
    if not torch.allclose(plain, ours, atol=tol, rtol=0):
        raise ValueError(f"attention backend {backend!r} misreads a custom 4-D attention mask; {hint}")
    if torch.allclose(plain, blocked, atol=0, rtol=0):
        raise ValueError(f"attention backend {backend!r} ignores custom 4-D attention masks; {hint}")


def make_trainable(model: nn.Module, new_token_ids: list[int], mode: str = "lora", lora_rank: int = 128,
                   lora_alpha: float | None = None, lora_dropout: float = 0.0,
                   target_modules: str | list[str] = "all-linear", full_modules: list[str] | None = None) -> nn.Module:
    """Choose what trains: ``lora`` = LoRA adapters + only the new embedding rows (peft), ``full`` = every weight.

    In ``lora`` mode the model is wrapped by peft; its ``trainable_token_indices`` trains just the memory-token
    rows of the input embedding, and both are saved with ``save_pretrained`` and load back with peft.
    ``full_modules``: a method's own modules (``Method.extend_model``), trained in full and saved with the adapter
    (peft's ``modules_to_save``), without LoRA on their layers.
    """
    if mode == "full":
        model.requires_grad_(True)
        return model
    if mode != "lora":
        raise ValueError(f"unknown training mode {mode!r}; choose 'lora' or 'full'")
    from peft import LoraConfig, get_peft_model

    own = {}
    if full_modules:
        own = {"modules_to_save": list(full_modules),
               "exclude_modules": rf".*\b({'|'.join(re.escape(m) for m in full_modules)})(\..*)?$"}
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, lora_dropout=lora_dropout,
                        target_modules=target_modules, trainable_token_indices=list(new_token_ids) or None,
                        task_type="CAUSAL_LM", **own)
    return get_peft_model(model, config)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the model's dropout probability (stages differ in dropout): nn.Dropout modules and the
    ``attention_dropout`` attribute that many HF attention modules use functionally. LoRA's own dropout
    (``model.lora_dropout``) is left as configured."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name:
            module.p = p
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            module.attention_dropout = p


def model_mask(mask: torch.Tensor, model: nn.Module, positions: torch.Tensor,
               key_positions: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Boolean (B, Lq, Lk) mask -> the attention mask a HF model takes as-is: 4-D, boolean for SDPA and other
    backends, additive float for ``eager``, which adds the mask to the scores (a boolean would silently add 0/1).

    Sliding-window layers (``sliding_window``) also hide every key ``window`` or more positions behind its query,
    as the model's own causal masks do, so a readout sees in training what it sees when decoded alone.
    ``positions`` (B, Lq) are the queries' position ids, ``key_positions`` (B, Lk) the keys' (default the same).
    A model that mixes sliding and full layers gets one mask per layer type (a dict, as HF's models take it)."""
    window, mixed = sliding_window(model)
    inner = getattr(model, "module", model)  # DistributedDataParallel hides the HF model's attributes
    eager = getattr(inner.config, "_attn_implementation", None) == "eager"

    def as_given(m: torch.Tensor) -> torch.Tensor:
        return additive_mask(m, inner.get_input_embeddings().weight.dtype) if eager else m.unsqueeze(1)

    if window is None:
        return as_given(mask)
    keys = positions if key_positions is None else key_positions
    near = mask & (positions[:, :, None] - keys[:, None, :] < window)
    return {"full_attention": as_given(mask), "sliding_attention": as_given(near)} if mixed else as_given(near)


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def sliding_window(model: nn.Module) -> tuple[int | None, bool]:
    """(window, mixed) from the model's config: the key window of its sliding-window attention layers (None when
    no layer has one), and whether full-attention layers are mixed in (``layer_types``). Every layer is sliding
    when the config sets a window and names no layer types (Mistral, Phi-3)."""
    config = hf_model(model).config.get_text_config()
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None, False
    return window, types is not None and set(types) != {"sliding_attention"}


@contextmanager
def logits_at(model: nn.Module, keep: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the model computes logits only at ``keep`` (N,), flat indices into the (B, L) positions of
    its input: it returns (N, V) logits in that order instead of (B, L, V). ``None`` changes nothing.

    A forward pre-hook on the output embedding (the LM head) gathers the last hidden states at those positions, so
    the (B, L, V) logits never exist. This works for any HF causal LM, which projects through
    ``get_output_embeddings()``, and keeps whatever wraps the head (peft's LoRA or trainable-token wrappers) or
    follows it (logit soft-capping, scaling). ``keep`` is made on the host (``collate``): no device sync.
    """
    if keep is None:
        yield
        return
    head = output_head(model, "supervised_logits")

    def gather(_module: nn.Module, args: tuple) -> tuple:
        return (rows_at(args[0], keep), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def output_head(model: nn.Module, switch: str) -> nn.Module:
    """The LM head (``get_output_embeddings``), through a DDP wrapper; an error naming the ``train.`` switch that
    needs it otherwise."""
    head = getattr(model, "module", model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding; set train.{switch}=false")
    return head


def rows_at(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, L, d) hidden states -> (N, d) at the flat positions ``keep``."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)


def head_linear(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """(weight, bias, replaced rows) of an LM head whose forward is exactly ``F.linear(x, weight, bias)`` with the
    rows ``index`` of the weight replaced by ``values`` when ``replaced`` = (index, values): an ``nn.Linear`` (tied
    to the input embedding or not), or peft's trainable-token wrapper of one (a tied head under LoRA, whose
    memory-token rows are the trained ``values``, as peft's own forward merges them). Anything else (a
    LoRA-adapted or quantised head) is refused."""
    from peft.utils.other import TrainableTokensWrapper

    if type(head).forward is nn.Linear.forward:
        return head.weight, head.bias, None
    if isinstance(head, TrainableTokensWrapper):
        layer = head.token_adapter
        weight, bias, _ = head_linear(layer.base_layer)
        if bias is None:  # peft's forward with active adapters drops a bias
            active = [] if layer.merged or layer.disable_adapters else layer.active_adapters
            if not active:
                return weight, None, None
            index = torch.tensor([i for a in active for i in layer.token_indices[a]], device=weight.device)
            return weight, None, (index, torch.cat([layer.trainable_tokens_delta[a] for a in active]))
    raise ValueError(f"LM head {type(head).__module__}.{type(head).__qualname__} is not a plain linear layer (or "
                     "peft's trainable tokens on one); set train.fused_loss=false")


@contextmanager
def loss_at(model: nn.Module, keep: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> Iterator[None]:
    """Within the block, the model returns as its ``logits`` the weighted readout loss at ``keep`` (N,):
    ``fused_linear_cross_entropy`` of the hidden states there with the LM head's weight and bias (``head_linear``),
    ``labels`` and ``weights`` (N,). The (N, V) logits never exist whole, only a chunk of rows at a time.

    The head's ``forward`` is swapped for the block, so the loss is computed inside the model's forward: under DDP
    the head's weights are used in the wrapped forward like any other and its gradient hooks fire as usual. A
    forward hook on the (unwrapped) model refuses a model that changes its head's output (logit soft-capping or
    scaling would silently be skipped) or never calls it.
    """
    head, inner = output_head(model, "fused_loss"), getattr(model, "module", model)
    returned: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        weight, bias, replaced = head_linear(head)
        returned.append(fused_linear_cross_entropy(rows_at(hidden, keep), weight, bias, labels, weights, replaced))
        return returned[-1]

    def check(_module: nn.Module, _args: tuple, output) -> None:
        if not returned or output.logits is not returned[-1]:
            raise ValueError("the model changes its LM head's output (logit soft-capping or scaling) or bypasses "
                             "get_output_embeddings(); set train.fused_loss=false")

    swapped = vars(head).get("forward")  # an instance-level forward (a hook library's) is put back afterwards
    head.forward = forward
    handle = inner.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()
        if swapped is None:
            del head.forward
        else:
            head.forward = swapped


def check_kept(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``logits`` unchanged, after checking that ``logits_at`` applied (a model that bypasses its output
    embedding would silently return every position's logits)."""
    if keep is not None and logits.shape[:-1] != keep.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {keep.numel()} kept positions: the model does "
                         "not compute logits through get_output_embeddings(); set train.supervised_logits=false")
    return logits


def masked_forward(model: nn.Module, batch: dict[str, torch.Tensor], readout_sees_question: bool = True,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of one forward pass over laid-out examples under the RiM mask and position ids: (B, L, V), or (N, V)
    at the flat positions ``keep`` only (see ``logits_at``)."""
    with logits_at(model, keep):
        logits = masked_call(model, batch, readout_sees_question).logits
    return check_kept(logits, keep)


def masked_loss(model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor, readout_sees_question: bool = True) -> torch.Tensor:
    """The weighted readout loss of ``masked_forward`` at ``keep``, fused with the LM head (``loss_at``): equal to
    ``weighted_readout_loss`` of its logits with ``labels`` and ``weights`` (N,), without materialising them."""
    with loss_at(model, keep, labels, weights):
        return masked_call(model, batch, readout_sees_question).logits


def masked_call(model: nn.Module, batch: dict[str, torch.Tensor], readout_sees_question: bool):
    """The model's output on laid-out examples under the RiM mask and position ids."""
    mask = attention_mask(batch["segment"], batch["index"], readout_sees_question)
    return model(input_ids=batch["input_ids"], attention_mask=model_mask(mask, model, batch["position_ids"]),
                 position_ids=batch["position_ids"], use_cache=False)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (less memory for large models), through HF's own
    switch; non-reentrant, so frozen base weights under LoRA need no input-gradient trick."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; "
                         "set train.gradient_checkpointing=false")
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers, which deprecate the old name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def tied_names(model: nn.Module) -> dict[str, str]:
    """Every ``state_dict`` name of a tensor beyond its first (a tied weight, such as an LM head that shares the input
    embedding), mapped to that first name."""
    first: dict[int, str] = {}
    return {name: first[id(t)] for name, t in model.state_dict(keep_vars=True).items()
            if first.setdefault(id(t), name) != name}


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model behind a DDP and a peft wrapper (either, both or none)."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def transformer_blocks(model: nn.Module, switch: str) -> list[nn.Module]:
    """The model's transformer blocks (instances of the classes HF lists in ``_no_split_modules``), through DDP and
    peft wrappers; an error naming the ``train.`` switch that needs them where the model lists none."""
    base = hf_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(base).__name__} names no transformer block class (_no_split_modules); "
                         f"set train.{switch}=false")
    return blocks


def decoder_stack(model: nn.Module) -> nn.Module:
    """The model without its LM head (HF ``get_decoder``: embeddings, blocks, final norm), through DDP and peft
    wrappers; an error naming ``train.compile_scope`` where the model has none apart from its head."""
    base = hf_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base or not isinstance(decoder, nn.Module):
        raise ValueError(f"{type(base).__name__} has no decoder apart from its LM head (get_decoder); set "
                         "train.compile_scope=blocks")
    return decoder


def compile_options(how: str) -> dict[str, str]:
    """``torch.compile``'s keyword for ``how``: an inductor mode, or else a backend."""
    return {"mode": how} if how in COMPILE_MODES else {"backend": how}


def compile_model(model: nn.Module, how: bool | str = True, scope: str = "blocks") -> int:
    """``torch.compile`` in place; returns how many modules were compiled. ``how``: True (the default mode), an
    inductor mode (``reduce-overhead`` records CUDA graphs, one set per batch shape) or a backend. ``scope``:
    ``blocks``, every transformer block on its own (small graphs, one compile serves all blocks), or ``decoder``,
    the whole stack at once (one graph forward and one backward: a call from Python per step instead of one per
    block, and fusion across blocks; a longer first compile). The head, the supervised-position gather and the
    loss stay eager: their shapes change every batch. What an earlier call compiled is undone first, so calls
    may switch scope or mode. Compiling in place keeps parameter names, so checkpoints are unaffected."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, not {scope!r}")
    for module in model.modules():
        if module._compiled_call_impl is not None:  # what nn.Module.compile set (torch's own attribute)
            module._compiled_call_impl = None
    modules = transformer_blocks(model, "compile") if scope == "blocks" else [decoder_stack(model)]
    options = {} if how is True else compile_options(how)
    for module in modules:
        module.compile(**options)
    return len(modules)
