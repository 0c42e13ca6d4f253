"""CODI and SIM-CoT's step supervision: layouts and distillation tokens, the batched cached latent passes (with
CODI's projection) against one-sequence recomputation, gradients with and without the cache, the loss against a
hand computation from separate forward passes, the step-decoding term, the decoder's absence from inference and
checkpoints, and short training runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES
from rim.config import ConfigError, StageConfig, load_config
from rim.core.layout import IGNORE
from rim.data.tasks import Example
from rim.methods.codi import PROJECTION, distillation_loss
from rim.methods.coconut import BOT, EOT, THOUGHT
from rim.methods.latent import latent_passes
from rim.methods.simcot import step_targets
from rim.train.loss import stage_weights
from test_methods import EXAMPLE, TASK, setup, spread, tiny_config, words

SFT = StageConfig(name="sft", kind="sft", steps=1)
EXAMPLES = (EXAMPLE, Example("5 1", ("5", "6"), "6"))


def codi(family: str = "llama", **cfg):
    """(model, tokenizer, method) with CODI's projection attached, weights spread so outputs depend on inputs."""
    model, tok, method = setup("codi", family, **cfg)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        method.extend_model(model)
    spread(model)
    return model, tok, method


def batch_of(method, tok, stage=SFT, examples=EXAMPLES):
    exs = [method.tokenize(TASK, tok, e) for e in examples]
    layouts = [method.train_layout(ex, stage) for ex in exs]
    return exs, layouts, method.collate(layouts, tok.pad_token_id)


def test_codi_layouts_teacher_student_and_the_token_before_the_answer():
    _, tok, method = codi(latents=3)
    ex = method.tokenize(TASK, tok, EXAMPLE)
    layout = method.train_layout(ex, SFT)
    q = words(tok, ex.question)
    assert words(tok, layout.input_ids) == q + [BOT, THOUGHT, THOUGHT, THOUGHT, EOT, "####", "1"]
    assert words(tok, layout.teacher.input_ids) == q + ["3", "0", "2", "1", "####", "1"]
    # the distillation token is "####" in both, and it predicts the answer's first token
    assert words(tok, [layout.input_ids[layout.distill]]) == ["####"] == words(tok, [layout.teacher.input_ids[
        layout.teacher_distill]])
    assert layout.labels[layout.distill] == layout.teacher.labels[layout.teacher_distill] == ex.answer[0]
    assert len(layout) == len(layout.input_ids)  # the student is the longer one here
    assert words(tok, method.prompt(ex, 8)) == q + [BOT]
    _, _, dropped = codi(latents=3, drop_last_step=True)
    assert words(tok, dropped.train_layout(dropped.tokenize(TASK, tok, EXAMPLE), SFT).teacher.input_ids) == \
        q + ["3", "0", "2", "####", "1"]


def reference(model, method, ids: list[int], first: int, n: int, at: int | None = None):
    """The definition on one unpadded sequence: thought j's input is the projected last hidden state of the
    position before it, each by a full recomputation; returns (logits, thoughts (n, H), hidden states at ``at``)."""
    project = getattr(model, PROJECTION)
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    thoughts = []
    for j in range(n):
        col = first + j
        hidden = model(inputs_embeds=embeds[:, :col], output_hidden_states=True).hidden_states[-1]
        thoughts.append(project(hidden[:, -1:]))
        embeds = torch.cat([embeds[:, :col], thoughts[-1], embeds[:, col + 1:]], dim=1)
    out = model(inputs_embeds=embeds, output_hidden_states=True)
    states = None if at is None else [h[0, at] for h in out.hidden_states]
    return out.logits[0], torch.cat(thoughts, dim=1)[0], states


@pytest.mark.parametrize("family", FAMILIES)
def test_codi_batched_cached_passes_equal_the_definition(family):
    model, tok, method = codi(family, latents=3)
    exs, layouts, batch = batch_of(method, tok)
    assert (batch["input_ids"][:, int(batch["latent_start"])] == tok.convert_tokens_to_ids(THOUGHT)).all()
    project = method.projection(model)
    with torch.no_grad():
        cached = latent_passes(model, batch, project=project, hidden_at=batch["distill"])
        uncached = latent_passes(model, batch, use_cache=False, project=project, hidden_at=batch["distill"])
    assert torch.allclose(cached.logits, uncached.logits, atol=1e-5)
    assert torch.allclose(cached.thoughts, uncached.thoughts, atol=1e-5)
    width = batch["input_ids"].shape[1]
    for row, (ex, layout) in enumerate(zip(exs, layouts)):
        with torch.no_grad():
            logits, thoughts, states = reference(model, method, layout.input_ids, len(ex.question) + 1, 3,
                                                 layout.distill)
        real = batch["attention_mask"][row].bool()
        assert torch.allclose(cached.logits[row][real], logits, atol=1e-5)
        assert torch.allclose(cached.thoughts[row], thoughts, atol=1e-5)
        assert int(batch["distill"][row]) // width == row
        for ours, theirs in zip(cached.hidden, states, strict=True):
            assert torch.allclose(ours[row], theirs, atol=1e-5)
    # the projection matters: without it the thoughts are other vectors
    with torch.no_grad():
        bare = latent_passes(model, batch)
    assert not torch.allclose(bare.thoughts, cached.thoughts, atol=1e-3)


def test_codi_gradients_are_equal_with_and_without_the_cache():
    model, tok, method = codi(latents=3)
    model.train()
    _, _, batch = batch_of(method, tok)
    grads = []
    for use_cache in (True, False):
        model.zero_grad()
        out = latent_passes(model, batch, use_cache, project=method.projection(model), hidden_at=batch["distill"])
        ce = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        (ce + sum(h.square().mean() for h in out.hidden)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(PROJECTION in n for n in grads[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


@pytest.mark.parametrize("kind", ["l1", "smooth_l1", "l2"])
def test_codi_loss_equals_a_hand_computation_from_separate_passes(kind):
    weights = {"teacher_weight": 0.5, "student_weight": 2.0, "distill_weight": 3.0}
    model, tok, method = codi(latents=2, distill_loss=kind, **weights)
    exs, layouts, batch = batch_of(method, tok)
    with torch.no_grad():
        loss = method.loss(model, batch, stage_weights(batch, SFT, 0.0))
        teacher_nll, student_nll, teacher_states, student_states = [], [], [], []
        for ex, layout in zip(exs, layouts):
            t = layout.teacher
            out = model(input_ids=torch.tensor([t.input_ids]), output_hidden_states=True)
            labels = torch.tensor(t.labels)
            teacher_nll.append(F.cross_entropy(out.logits[0], labels, ignore_index=IGNORE, reduction="sum"))
            teacher_states.append([h[0, layout.teacher_distill] for h in out.hidden_states])
            logits, _, states = reference(model, method, layout.input_ids, len(ex.question) + 1, 2, layout.distill)
            student_nll.append(F.cross_entropy(logits, torch.tensor(layout.labels), ignore_index=IGNORE,
                                               reduction="sum"))
            student_states.append(states)
    n_teacher = sum(sum(x != IGNORE for x in lay.teacher.labels) for lay in layouts)
    n_student = sum(sum(x != IGNORE for x in lay.labels) for lay in layouts)
    per_layer = []
    for layer in range(len(teacher_states[0])):
        t = torch.stack([s[layer] for s in teacher_states])
        s = torch.stack([s[layer] for s in student_states])
        diff = s - t
        distance = {"l1": diff.abs().mean(), "l2": diff.square().mean(),
                    "smooth_l1": torch.where(diff.abs() < 1, 0.5 * diff.square(), diff.abs() - 0.5).mean()}[kind]
        per_layer.append(distance / t.std() ** (2 if kind == "l2" else 1))
    hand = (0.5 * sum(teacher_nll) / n_teacher + 2.0 * sum(student_nll) / n_student
            + 3.0 * sum(per_layer) / len(per_layer))
    assert len(per_layer) == 3  # the embeddings' output and the 2 layers
    assert torch.allclose(loss, hand, atol=1e-4), (loss, hand)


def test_codi_distillation_target_is_held_fixed():
    """Stop-gradient: the distillation term sends no gradient into the teacher's pass; the student's does."""
    student = [torch.randn(2, 4, requires_grad=True)]
    teacher = [torch.randn(2, 4, requires_grad=True)]
    distillation_loss(student, [t.detach() for t in teacher]).backward()
    assert student[0].grad is not None and teacher[0].grad is None
    model, tok, method = codi(latents=2)
    _, _, batch = batch_of(method, tok)
    _, states = method.teacher_pass(model, batch["teacher"], batch["teacher_distill"])
    assert all(not s.requires_grad for s in states)


def test_step_targets_split_steps_over_thought_groups():
    assert step_targets([[1], [2], [3], [4]], [9, 8], 2) == [[1], [2, 3, 4]]
    assert step_targets([[1], [2]], [9, 8], 4) == [[1], [2], [9, 8], [9, 8]]
    assert step_targets([[1]], [9], 0) == []
    _, tok, method = setup("coconut", thoughts_per_step=2, max_latent_steps=2, step_supervision=True)
    ex = method.tokenize(TASK, tok, EXAMPLE)  # steps 3 0 2 1
    targets = [[words(tok, s) for s in method.train_layout(ex, StageConfig(name="s", kind="latent", steps=1,
                                                                             latent_steps=k)).step_targets]
               for k in (0, 1, 2, 3)]
    assert targets == [[], [["3"]], [["3"], ["0"]], [["3"], ["0", "2", "1"]]]  # past the maximum: all steps


def hand_step_loss(model, decoder, thoughts: torch.Tensor, targets: list[list[list[int]]], eos: int) -> torch.Tensor:
    """SIM-CoT's step term by hand, one decoded step at a time: the group's thoughts, then the step's embedded
    tokens, positions from 1; the summed NLL of the step and EOS, averaged over every (example, group)."""
    embed = model.get_input_embeddings()
    losses = []
    for row, groups in enumerate(targets):
        c = thoughts.shape[1] // len(groups)
        for g, step in enumerate(groups):
            inputs = torch.cat([thoughts[row:row + 1, g * c:(g + 1) * c], embed(torch.tensor([step]))], dim=1)
            positions = torch.arange(1, inputs.shape[1] + 1)[None]
            logits = decoder(inputs_embeds=inputs, position_ids=positions).logits[0]
            losses.append(F.cross_entropy(logits[c - 1:], torch.tensor(step + [eos]), reduction="sum"))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("decoder", ["separate", "shared"])
def test_step_supervision_adds_exactly_the_weighted_step_term_to_codi(decoder):
    model, tok, plain = codi(latents=3)
    _, _, method = setup("codi", latents=3, step_supervision=True, step_supervision_weight=0.7,
                         step_decoder=decoder)
    method.prepare_training(model)
    if decoder == "separate":
        assert method.steps.decoder is not model and method.training_parameters()
        with torch.no_grad():  # the copy trains on its own: make it differ, so that the test sees which one runs
            for p in method.steps.decoder.parameters():
                p.mul_(0.9)
    exs, layouts, batch = batch_of(method, tok)
    weights = stage_weights(batch, SFT, 0.0)
    with torch.no_grad():
        with_steps = method.loss(model, batch, weights)
        without = plain.loss(model, batch, weights)
        thoughts = torch.stack([reference(model, method, lay.input_ids, len(ex.question) + 1, 3)[1]
                                for ex, lay in zip(exs, layouts)])
        step = hand_step_loss(model, method.steps.decoder or model, thoughts, [lay.step_targets for lay in layouts],
                              tok.eos_token_id)
    assert words(tok, layouts[1].step_targets[0] + layouts[1].step_targets[2]) == ["5", "####", "6"]
    assert step > 0 and torch.allclose(with_steps - without, 0.7 * step, atol=1e-4)


def test_step_supervision_adds_exactly_the_weighted_step_term_to_coconut():
    model, tok, method = setup("coconut", thoughts_per_step=2, max_latent_steps=2, step_supervision=True,
                               step_decoder="shared")
    _, _, plain = setup("coconut", thoughts_per_step=2, max_latent_steps=2)
    spread(model)
    stage = StageConfig(name="s2", kind="latent", steps=1, latent_steps=2)
    exs, layouts, batch = batch_of(method, tok, stage)
    weights = stage_weights(batch, stage, 0.0)
    with torch.no_grad():
        assert plain.loss(model, batch, weights) is None  # the standard loss
        from rim.train.loss import step_loss

        step = method.loss(model, batch, weights) - step_loss(plain, model, batch, weights)
        thoughts = latent_passes(model, batch, use_cache=False).thoughts
        hand = hand_step_loss(model, model, thoughts, [lay.step_targets for lay in layouts], tok.eos_token_id)
    assert torch.allclose(step, hand, atol=1e-4)


def test_generation_with_projected_thoughts_equals_the_definition():
    model, tok, method = codi(latents=3)
    ex = method.tokenize(TASK, tok, EXAMPLE)
    gen = method.generate(model, [method.prompt(ex, 8)], tok.pad_token_id, -1, 1)
    ids = method.prompt(ex, 8) + [tok.convert_tokens_to_ids(THOUGHT)] * 3 + [tok.convert_tokens_to_ids(EOT)]
    with torch.no_grad():
        logits, _, _ = reference(model, method, ids, len(ex.question) + 1, 3)
    assert gen.tokens[0] == [int(logits[-1].argmax())]
    assert "hidden states" in method.plain_decoding()  # rim export refuses it


def test_step_decoder_is_never_used_in_generation():
    model, tok, method = codi(latents=3, step_supervision=True)
    _, _, plain = codi(latents=3)
    method.prepare_training(model)

    def refuse(*args, **kwargs):
        raise AssertionError("the auxiliary decoder ran at inference")

    method.steps.decoder.forward = refuse
    prompts = [method.prompt(method.tokenize(TASK, tok, Example(q, ("0",), "0")), 1) for q in ("3 7 2 9", "5")]
    assert method.generate(model, prompts, tok.pad_token_id, -1, 4).tokens == \
        plain.generate(model, prompts, tok.pad_token_id, -1, 4).tokens


def test_projection_trains_in_full_under_lora_and_round_trips():
    from peft import PeftModel

    from rim.models.adapter import hf_model, make_trainable

    model, tok, method = codi(latents=2)
    names = method.extend_model(model)
    assert names == [PROJECTION] and method.extend_model(model) == names  # attached once
    peft_model = make_trainable(model, [], "lora", lora_rank=2, full_modules=names)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(PROJECTION in n for n in trainable)
    assert not any(PROJECTION in n and "lora" in n for n in trainable)  # no LoRA on the projection's layers
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if PROJECTION in n and p.requires_grad:
                p.add_(0.5)
    import tempfile

    folder = tempfile.mkdtemp()
    peft_model.save_pretrained(folder)
    fresh, _, again = codi(latents=2)
    again.extend_model(fresh)
    loaded = PeftModel.from_pretrained(fresh, folder)
    x = torch.randn(3, 32)
    assert torch.allclose(hf_model(loaded).codi_projection(x), hf_model(peft_model).codi_projection(x))


def test_codi_and_step_supervision_settings_are_checked():
    with pytest.raises(ConfigError, match="method.step_supervision"):
        load_config(None, ["method.name=nocot", "stages=[{name: a, kind: sft, steps: 1}]",
                           "method.step_supervision=true"])
    with pytest.raises(ConfigError, match="method.distill_loss"):
        load_config(None, ["method.name=codi", "stages=[{name: a, kind: sft, steps: 1}]", "method.distill_loss=kl"])
    with pytest.raises(ConfigError, match="method.step_decoder"):
        load_config(None, ["method.name=codi", "stages=[{name: a, kind: sft, steps: 1}]", "method.step_decoder=x"])
    with pytest.raises(ConfigError, match="train.fsdp"):
        load_config(None, ["method.name=codi", "stages=[{name: a, kind: sft, steps: 1}]", "train.fsdp=true"])


@pytest.mark.slow
@pytest.mark.parametrize("method,stages,extra", [
    ("codi", ["{name: sft, kind: sft, steps: 2}"], ["method.latents=2"]),
    ("codi", ["{name: sft, kind: sft, steps: 2}"], ["method.latents=2", "method.step_supervision=true"]),
    ("coconut", ["{name: s0, kind: latent, steps: 2, latent_steps: 0}",
                 "{name: s1, kind: latent, steps: 2, latent_steps: 1}"],
     ["method.max_latent_steps=1", "method.step_supervision=true"]),
])
def test_latent_methods_train_evaluate_and_save_no_decoder(tmp_path, method, stages, extra):
    from safetensors.torch import load_file

    from rim.eval.run import eval_run, load_run
    from rim.train.loop import train

    run = train(tiny_config(method, stages, tmp_path, extra))
    metrics = eval_run(run).metrics
    assert metrics["method"] == method and metrics["n"] == 8 and metrics["ttft_ms"] > 0
    saved = load_file(run / "checkpoint" / "model.safetensors")
    _, model, _, loaded, _ = load_run(run, device="cpu")
    layers = {k for k in saved if ".layers." in k}
    assert len(layers) == len({n for n in model.state_dict() if ".layers." in n})  # one model's layers: no decoder
    if method == "codi":  # the trained projection comes back with the checkpoint
        for name, value in getattr(model, PROJECTION).state_dict().items():
            assert torch.equal(value, saved[f"{PROJECTION}.{name}"])
