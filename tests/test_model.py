"""Invariants on real (tiny, random) Hugging Face models: no leakage, one pass == separate passes, decoding,
what trains, and the custom-mask capability check."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, WINDOWED, make_tiny, make_windowed
from transformers.modeling_outputs import CausalLMOutputWithPast
from rim.config import StageConfig
from rim.core.batch import collate
from rim.core.curriculum import weighted_readout_loss
from rim.core.layout import READOUT, Readout, build_layout, grounding_readouts, refinement_readouts
from rim.infer.generate import greedy_generate
from rim.models.adapter import check_custom_mask_support, make_trainable, masked_forward
from rim.train.loss import stage_weights

QUESTION = [4, 5, 6, 7, 8]


def grounding_example(mem, m=2):
    readouts = grounding_readouts([[9, 10], [11]], [12, 13])
    return build_layout(QUESTION, [mem.block(m)] * len(readouts), readouts, eos_id=2)


def refinement_example(mem, k=3, m=2):
    return build_layout(QUESTION, [mem.block(m)] * k, refinement_readouts([12, 13], k), eos_id=2)


def logits_of(model, layout, sees_question=True):
    with torch.no_grad():
        return masked_forward(model, collate([layout], pad_id=0), sees_question)[0]


@pytest.mark.parametrize("sees_question", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_leakage_from_any_readout(family, attn, sees_question):
    model, _, mem = make_tiny(family, attn)
    layout = grounding_example(mem)
    base = logits_of(model, layout, sees_question)
    for j in range(1, len(layout.readouts) + 1):
        perturbed = build_layout(QUESTION, [mem.block(2)] * 3,
                                 [Readout([3] * len(r.ids), r.step, r.n_steps) if k == j else r
                                  for k, r in enumerate(layout.readouts, start=1)], eos_id=2)
        out = logits_of(model, perturbed, sees_question)
        in_j = torch.tensor([s == READOUT and k == j for s, k in zip(layout.segment, layout.index)])
        assert torch.allclose(out[~in_j], base[~in_j], atol=1e-5), f"readout {j} leaks"
        assert not torch.allclose(out[in_j], base[in_j], atol=1e-4)  # the perturbation is real


def test_blocks_do_influence_later_readouts(tiny):
    """Negative control for the leakage test: perturbing a block token must change later readouts."""
    model, _, mem = tiny
    layout = refinement_example(mem)
    base = logits_of(model, layout)
    changed = list(layout.input_ids)
    changed[len(QUESTION) + 1] = 3  # a memory token of block 1
    layout.input_ids = changed
    out = logits_of(model, layout)
    assert not torch.allclose(out[-1], base[-1], atol=1e-4)


@pytest.mark.parametrize("stage", ["grounding", "refinement"])
def test_one_masked_pass_equals_separate_inference_passes(tiny, stage):
    model, _, mem = tiny
    layout = grounding_example(mem) if stage == "grounding" else refinement_example(mem)
    masked = logits_of(model, layout)
    block = mem.block(2)
    for k, readout in enumerate(layout.readouts, start=1):
        seq = QUESTION + block * k + readout.ids  # exactly what inference runs after k blocks
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([seq])).logits[0]
        keep = [i for i, (s, j) in enumerate(zip(layout.segment, layout.index)) if not (s == READOUT and j != k)
                and not (j > k)]
        assert [layout.input_ids[i] for i in keep] == seq
        assert torch.allclose(masked[keep], alone, atol=1e-5), f"readout {k} differs from its inference pass"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", WINDOWED)
def test_sliding_window_layers_see_in_one_masked_pass_what_they_see_alone(kind, attn):
    """Sequences longer than the window: the one masked pass still equals each readout's inference pass, where
    the model applies its own sliding windows (by position: readouts sit side by side in the masked pass)."""
    from rim.models.adapter import sliding_window

    model, _, mem = make_windowed(kind, attn, window=4)
    assert sliding_window(model) == (4, kind == "gemma3_text")
    check_custom_mask_support(model)
    layout = grounding_example(mem)
    masked = logits_of(model, layout)
    for k, readout in enumerate(layout.readouts, start=1):
        seq = QUESTION + mem.block(2) * k + readout.ids
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([seq])).logits[0]
        keep = [i for i, (s, j) in enumerate(zip(layout.segment, layout.index)) if not (s == READOUT and j != k)
                and not (j > k)]
        assert torch.allclose(masked[keep], alone, atol=1e-5), f"readout {k} differs from its inference pass"


def test_layers_a_mask_cannot_steer_are_refused():
    model, _, _ = make_tiny("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        check_custom_mask_support(model)


def _prompts(mem):
    block = mem.block(2)
    return [QUESTION + block * 2, [4, 5] + block, [9, 8, 7, 6, 5, 4, 3] + block * 3]


def test_kv_cached_decoding_equals_uncached(tiny):
    model, tok, mem = tiny
    prompts = _prompts(mem)
    cached = greedy_generate(model, prompts, tok.pad_token_id, tok.eos_token_id, 6, use_cache=True)
    plain = greedy_generate(model, prompts, tok.pad_token_id, tok.eos_token_id, 6, use_cache=False)
    assert cached.tokens == plain.tokens
    assert all(len(t) > 0 for t in cached.tokens)


def test_padded_batch_equals_single_examples(tiny):
    model, tok, mem = tiny
    prompts = _prompts(mem)
    batch = greedy_generate(model, prompts, tok.pad_token_id, tok.eos_token_id, 6).tokens
    singles = [greedy_generate(model, [p], tok.pad_token_id, tok.eos_token_id, 6).tokens[0] for p in prompts]
    assert batch == singles


class CountingLM(torch.nn.Module):
    """Predicts last token + 1, capped at EOS = 9: a prompt ending in 7 answers [8] and stops."""

    config = None

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, **kwargs):
        nxt = (input_ids[:, -1:] + 1).clamp(max=9)
        logits = torch.nn.functional.one_hot(nxt, 10).float()
        return CausalLMOutputWithPast(logits=logits)


def test_decoding_stops_at_eos_per_sequence():
    gen = greedy_generate(CountingLM(), [[1, 7], [3]], pad_id=0, eos_id=9, max_new_tokens=4, use_cache=False)
    assert gen.tokens == [[8], [4, 5, 6, 7]]
    assert len(gen.step_s) == 4
    gen = greedy_generate(CountingLM(), [[1, 7], [6]], pad_id=0, eos_id=9, max_new_tokens=6, use_cache=False)
    assert gen.tokens == [[8], [7, 8]] and len(gen.step_s) == 3  # stops once every sequence has its EOS


def _one_step(model, mem, weight_decay=0.01):
    layout = grounding_example(mem)
    batch = collate([layout, refinement_example(mem)], pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    model.train()
    stage = StageConfig(name="g", kind="grounding", steps=1)
    loss = weighted_readout_loss(masked_forward(model, batch), batch["labels"], stage_weights(batch, stage, 0.3))
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_step_changes_only_memory_rows_and_lora(family):
    model, tok, mem = make_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emb_before = model.get_input_embeddings().weight.detach().clone()
    peft_model = make_trainable(model, mem.all, "lora", lora_rank=4, lora_alpha=8)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    _one_step(peft_model, mem)
    after = dict(peft_model.named_parameters())
    for name, value in after.items():
        if name in trainable:
            if "lora_B" in name or "trainable_tokens" in name:  # lora_B starts at 0 and must move
                assert value.abs().sum() > 0, name
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if key in before:
            assert torch.equal(value, before[key]), f"frozen {name} changed"
    ids = torch.arange(emb_before.shape[0])
    with torch.no_grad():
        emb_after = peft_model.get_input_embeddings()(ids)
    new = torch.tensor(mem.all)
    old = torch.tensor([i for i in ids.tolist() if i not in mem.all])
    assert torch.equal(emb_after[old], emb_before[old])
    assert not torch.allclose(emb_after[new], emb_before[new])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_step_changes_every_weight(family):
    model, tok, mem = make_tiny(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_trainable(model, mem.all, "full")
    _one_step(model, mem)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_mask_ignoring_backend_is_refused():
    model, _, _ = make_tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="ignores RiM's custom attention mask"):
        check_custom_mask_support(model)


class MaskIgnoringLM(torch.nn.Module):
    """A causal LM that drops the attention mask it is given (as some custom kernels do)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_mask_ignoring_model_is_refused_by_probe():
    model, _, _ = make_tiny("gpt2")
    with pytest.raises(ValueError, match="ignores custom 4-D attention masks"):
        check_custom_mask_support(MaskIgnoringLM(model))
    check_custom_mask_support(model)  # the real model passes
