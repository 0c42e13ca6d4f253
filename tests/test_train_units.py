"""Units of the training harness: stage length, seeding, dropout per stage, memory-row init, optimizer reset,
a DDP-wrapped model, FSDP2 settings around a sharded evaluation, optimizer states written with or without FSDP."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import WORDS, make_tiny
from rim.config import StageConfig
from rim.core.batch import collate
from rim.core.layout import build_layout, refinement_readouts
from rim.models.adapter import add_memory_tokens, make_trainable, masked_forward, set_dropout
from rim.models.tiny import tiny_model, word_tokenizer
from rim.train.optim import fresh_optimizer
from rim.train.sampling import stage_length


def test_stage_length_counts_epochs_as_accelerate_steps():
    assert stage_length(StageConfig(steps=7), 100, 4) == 7
    assert stage_length(StageConfig(epochs=6), 5, 1) == 30
    assert stage_length(StageConfig(epochs=6), 5, 2) == 18  # 3 optimizer steps per epoch of 5 micro-batches
    assert stage_length(StageConfig(epochs=0.5), 10, 1) == 5


def test_tiny_model_init_follows_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_model(20, "llama", layers=1, hidden=16, heads=2, seed=0)
    assert torch.rand(1) == expected
    b = tiny_model(20, "llama", layers=1, hidden=16, heads=2, seed=1)
    c = tiny_model(20, "llama", layers=1, hidden=16, heads=2, seed=0)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert not torch.equal(wa, wb) and torch.equal(wa, wc)


def test_set_dropout_keeps_lora_dropout():
    model, _, mem = make_tiny("gpt2")
    peft_model = make_trainable(model, mem.all, "lora", lora_rank=2, lora_dropout=0.05)
    set_dropout(peft_model, 0.3)
    probs = {n: m.p for n, m in peft_model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert probs and all(p == (0.05 if "lora_dropout" in n else 0.3) for n, p in probs.items())
    llama, _, _ = make_tiny("llama")
    set_dropout(llama, 0.2)
    assert llama.model.layers[0].self_attn.attention_dropout == 0.2


def test_memory_rows_start_at_mean_even_with_spare_vocab_rows():
    tok = word_tokenizer(WORDS)
    model = tiny_model(len(tok) + 16, "llama", layers=1, hidden=16, heads=2)  # padded vocabulary: no resize needed
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tok):] = 7.0  # spare rows hold junk
    real_mean = model.get_input_embeddings().weight[: len(tok)].mean(0).clone()
    mem = add_memory_tokens(tok, model)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 13  # not resized
    assert torch.allclose(model.get_input_embeddings().weight[mem.all], real_mean.expand(3, -1))
    with torch.no_grad():
        model.get_input_embeddings().weight[mem.all] = 1.0  # "trained"
    assert add_memory_tokens(tok, model) == mem  # already present: trained rows are kept
    assert (model.get_input_embeddings().weight[mem.all] == 1.0).all()
    base = tiny_model(len(word_tokenizer(WORDS)), "llama", layers=1, hidden=16, heads=2)  # a model without them
    real_mean = base.get_input_embeddings().weight.mean(0).clone()
    assert add_memory_tokens(tok, base) == mem and base.get_input_embeddings().weight.shape[0] == len(tok)
    assert torch.allclose(base.get_input_embeddings().weight[mem.all], real_mean.expand(3, -1))


def test_optimizer_reset_frees_the_old_state():
    from accelerate import Accelerator

    model, _, _ = make_tiny("llama")
    accelerator = Accelerator(cpu=True)
    first = fresh_optimizer(model, StageConfig(lr=1e-3), accelerator)
    model(input_ids=torch.tensor([[4, 5]])).logits.sum().backward()
    first.step()
    assert len(first.optimizer.state) > 0
    second = fresh_optimizer(model, StageConfig(lr=1e-4), accelerator, first)
    assert len(first.optimizer.state) == 0 and accelerator._optimizers == [second]


def test_masked_forward_through_ddp_wrapper(tmp_path):
    model, _, mem = make_tiny("llama", attn="eager")  # eager: the mask path that reads the model's dtype
    layout = build_layout([4, 5, 6], [mem.block(2)] * 2, refinement_readouts([7], 2), eos_id=2)
    batch = collate([layout], pad_id=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        with torch.no_grad():
            assert torch.allclose(masked_forward(wrapped, batch), masked_forward(model, batch))
            keep = batch["supervised"]
            kept = masked_forward(wrapped, batch, keep=keep)  # logits at the labels only, through the wrapper
            assert torch.allclose(kept, masked_forward(model, batch).flatten(0, 1)[keep], atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_gathered_restores_fsdp2_resharding_after_forward(tmp_path):
    """After a sharded evaluation the blocks reshard after forward again and the root stays whole, as FSDP2 sets
    them up (resharding the root too would cost every training step an extra all-gather)."""
    from rim.train.sharding import fsdp_modules, gathered, shard_model

    def reshards() -> list[bool]:
        return [unit._get_fsdp_state()._fsdp_param_groups[0].post_forward_mesh_info is not None
                for unit in fsdp_modules(model)]

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = shard_model(tiny_model(20, "llama", layers=2, hidden=16, heads=2), torch.device("cpu"), "no")
        x = torch.tensor([[4, 5, 6]])
        model(input_ids=x).logits.sum().backward()
        assert reshards() == [False, True, True]  # the root, then the two blocks
        with torch.no_grad(), gathered(model):
            model(input_ids=x)
        assert reshards() == [False, True, True]
    finally:
        dist.destroy_process_group()


def test_optimizer_state_keyed_by_index_or_by_name_converts_both_ways(tmp_path):
    """A data-parallel checkpoint keys the optimizer state by parameter index, an FSDP one by name (as
    torch.distributed.checkpoint writes it): either resumes under the other setting."""
    from accelerate import Accelerator
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from rim.errors import CheckpointError
    from rim.train.optim import keyed_optimizer_state

    model, _, _ = make_tiny("llama")  # tied embeddings: the head's weight is the embedding's
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # not in the optimizer
    optimizer = fresh_optimizer(model, StageConfig(lr=1e-3), Accelerator(cpu=True))
    model(input_ids=torch.tensor([[4, 5]])).logits.sum().backward()
    optimizer.step()
    by_index, by_name = optimizer.state_dict(), get_optimizer_state_dict(model, optimizer.optimizer)
    converted = keyed_optimizer_state(by_index, model, True, tmp_path)
    assert converted["param_groups"] == by_name["param_groups"]
    assert converted["state"].keys() == by_name["state"].keys()
    assert all(torch.equal(converted["state"][k]["exp_avg"], by_name["state"][k]["exp_avg"]) for k in by_name["state"])
    back = keyed_optimizer_state(by_name, model, False, tmp_path)
    assert back["param_groups"] == by_index["param_groups"] and back["state"].keys() == by_index["state"].keys()
    assert keyed_optimizer_state(by_index, model, False, tmp_path) is by_index
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(CheckpointError, match="do not match"):
        keyed_optimizer_state(by_index, model, True, tmp_path)


@pytest.mark.slow
def test_an_epochs_short_last_step_is_not_scaled_down(tmp_path, monkeypatch):
    """grad_accum=2 over 3 batches an epoch: the second step has one micro-batch. accelerate divides each loss by
    2; that micro-batch's loss goes to the backward doubled, so its step's gradient is its mean, as for full steps."""
    import json

    from accelerate import Accelerator

    from rim.config import load_config
    from rim.train.loop import train

    passed = []
    original = Accelerator.backward

    def backward(self, loss, **kwargs):
        passed.append(loss.item())
        return original(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", backward)
    cfg = load_config(None, ["model.tiny_layers=1", "model.tiny_hidden=16", "model.tiny_heads=2", "train.device=cpu",
                             "train.progress=false", "train.batch_size=8", "train.grad_accum=2", "train.log_every=1",
                             "data.options={n_train: 24, n_test: 4, n_valid: 4}",
                             "stages=[{name: g, kind: grounding, steps: 4}]", f"output_dir={tmp_path / 'run'}"])
    train(cfg)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in logged if e["event"] == "train"]  # a step's mean micro-batch loss
    assert len(passed) == 6 and len(losses) == 4  # micro-batches 2 + 1 + 2 + 1
    assert passed[0] + passed[1] == pytest.approx(2 * losses[0]) and passed[2] == pytest.approx(2 * losses[1])
    assert passed[3] + passed[4] == pytest.approx(2 * losses[2]) and passed[5] == pytest.approx(2 * losses[3])
