"""llama.cpp: a SmolLM2-135M-based RiM run, exported and converted to GGUF by llama.cpp's own converter, decodes
``question + K blocks`` greedily in llama.cpp to exactly the tokens `rim answer` decodes, for the trained K and
another; the memory tokens stay added tokens at their ids, and llama.cpp's tokenizer splits them out of text."""

from __future__ import annotations

import importlib.util

import pytest

for _pkg, _install in [("llama_cpp", "pip install -e '.[llamacpp]' (builds llama.cpp from source, about 5 min)"),
                       ("sentencepiece", "pip install -e '.[llamacpp]'")]:
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"{_pkg} not installed ({_install})", allow_module_level=True)

from rim.config import load_config  # noqa: E402

QUESTIONS = ["1 2 3", "4 5 6", "7 8 0", "9 9 1", "3 0 2", "Tom has 3 apples and eats one. How many are left?"]


@pytest.fixture(scope="module")
def smollm2_export(smollm2_dir, tmp_path_factory):
    """A RiM run on SmolLM2-135M (LoRA, 2 + 2 steps, K = 3), exported and converted to an f32 GGUF."""
    from rim.integrations.llamacpp import convert
    from rim.serve import export_run
    from rim.train.loop import train

    tmp = tmp_path_factory.mktemp("llamacpp")
    run = train(load_config(None, [
        f"model.name={smollm2_dir}", "model.train_mode=lora", "model.lora_rank=4", "method.name=rim",
        "method.memory_tokens=2", "method.blocks=3", "data.options={digits: 3, n_train: 64, n_test: 8, n_valid: 8}",
        "stages=[{name: g, kind: grounding, steps: 2, lr: 1e-3}, {name: r, kind: refinement, steps: 2, lr: 1e-3}]",
        "train.batch_size=8", "train.progress=false", "train.device=cpu", f"output_dir={tmp / 'run'}"]))
    export = export_run(run, tmp / "export")
    return run, export, convert(export, "f32")


@pytest.mark.slow
def test_llama_cpp_decodes_question_plus_k_blocks_as_rim_answer(smollm2_export):
    from llama_cpp import Llama

    from rim.integrations.exported import PromptRule, read_meta
    from rim.serve import answer, open_run, question_example

    run, export, gguf = smollm2_export
    rule = PromptRule.from_meta(read_meta(export))
    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False)
    decoded = []
    for k in (3, 5):  # trained K, and another
        served = open_run(run, device="cpu", blocks=k)
        tok, eos = served.tokenizer, served.tokenizer.eos_token_id
        rim_text = [rec["output"] for rec in answer(served, QUESTIONS)]
        for question, expected_text in zip(QUESTIONS, rim_text):
            prompt = served.method.prompt(question_example(served, question), k)
            assert prompt == rule.prompt(tok, question, k)  # the export's rule is rim's prompt
            expected = served.method.generate(served.model, [prompt], tok.pad_token_id, eos,
                                              served.max_new_tokens).tokens[0]
            got = []
            for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):  # greedy
                if token == eos or len(got) == served.max_new_tokens:
                    break
                got.append(token)
            assert got == expected, (k, question, tok.decode(got), tok.decode(expected))
            decoded.append(len(got))
            assert tok.decode(got, skip_special_tokens=True) == expected_text
        suffix = rule.suffix(k)
        text = "".join(tok.convert_ids_to_tokens(suffix))
        # llama.cpp's own tokenizer: the memory tokens are split out of text whole, as in transformers
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == suffix
        question = QUESTIONS[-1]
        assert llm.tokenize((question + text).encode(), add_bos=False, special=True) == rule.prompt(tok, question, k)
    assert sum(decoded) >= len(decoded)  # answers were decoded, not only EOS
