"""Tiny models trained from scratch, built locally (no hub): the demo's model and the tests' fixtures.

``word_tokenizer`` makes a whitespace word-level tokenizer (a real ``PreTrainedTokenizerFast`` that saves and
loads like any other); ``tiny_model`` makes a randomly initialised Llama- or GPT-2-shaped causal LM.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` plus pad/bos/eos/unk.

    >>> word_tokenizer(["1", "2", "+"])("1 + 2")["input_ids"]   # <s> 1 + 2
    [1, 5, 4, 6]
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL.values()) + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # BOS first, as most pretrained tokenizers do: a fixed first token gives rotary-position models an anchor
    bos = SPECIAL["bos_token"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    # no decoder: decoding joins the words with single spaces (a WordPiece decoder would eat "##" prefixes)
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL)


def tiny_model(vocab_size: int, family: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4,
               max_positions: int = 512, attn_implementation: str = "sdpa", seed: int = 0,
               kv_heads: int | None = None, ffn: int | None = None, device=None, **extra):
    """A randomly initialised causal LM of the given family ('llama' or 'gpt2') and shape, with tied embeddings.
    ``kv_heads`` (llama; default half the heads) and ``ffn`` (default 4 x hidden) for other shapes (``rim bench``);
    ``device``: where the weights are made (default the CPU)."""
    import torch

    # special-token ids of ``word_tokenizer`` (pad 0, bos 1, eos 2) unless the caller says otherwise
    extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **extra}
    if family == "llama":
        config = AutoConfig.for_model("llama", vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads or max(1, heads // 2),
                                      intermediate_size=ffn or hidden * 4, max_position_embeddings=max_positions,
                                      tie_word_embeddings=True, **extra)
    elif family == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                                      n_inner=ffn, n_positions=max_positions, **extra)
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose 'llama' or 'gpt2'")
    device = torch.device(device or "cpu")
    # seeded init that leaves the caller's RNG stream alone
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
