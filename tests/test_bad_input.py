"""Bad input: every loader turns random malformed records into Examples or a DataError naming file and line (or
record), never another exception; strict and skip agree; over-long examples; config ranges; no unsafe loading."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.config import ConfigError, DataConfig, MethodConfig, StageConfig, load_config
from rim.data.benchmarks import parse_number
from rim.data.multiplication import multiplication_line
from rim.data.records import DataError, Records
from rim.data.tasks import Example, Task, make_task, read_jsonl
from rim.methods.base import make_method, tokenize_training, training_length

SRC = Path(__file__).resolve().parents[1] / "src" / "rim"
PROPERTY = settings(max_examples=40, deadline=None)

# ------------------------------------------------------------------ strategies: good records and their corruptions

json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3),
                          max_leaves=6)
text = st.text(min_size=1, max_size=12).filter(str.strip)
line_text = st.text(st.characters(codec="utf-8", exclude_characters="|#\n\r"), min_size=1,
                    max_size=12).filter(str.strip)
number = st.integers(-10**6, 10**6) | st.floats(-1e6, 1e6) | st.integers(0, 10**7).map(lambda n: f"{n:,}")
blank = st.sampled_from([b"", b"  ", b"\t"])
SEPARATORS = ["||", "####", " + ", " ( ", " ) ", ",", " "]  # of the text line formats


@st.composite
def corrupted(draw, good: st.SearchStrategy[dict]) -> object:
    """A good record with one field dropped, blanked or replaced by a random JSON value (or an item appended to a
    list field)."""
    rec = dict(draw(good))
    key = draw(st.sampled_from(sorted(rec)))
    action = draw(st.sampled_from(["drop", "value", "blank", "item"]))
    if action == "drop":
        del rec[key]
    elif action == "blank":
        rec[key] = draw(st.sampled_from(["", " ", "\t\n"]))
    elif action == "item" and isinstance(rec[key], list):
        rec[key] = [*rec[key], draw(json_value | st.just(""))]
    else:
        rec[key] = draw(json_value)
    return rec


def half(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` or ``bad``, one half each (``good | bad`` would weight every alternative inside ``bad`` alike)."""
    return st.booleans().flatmap(lambda ok: good if ok else bad)


def any_record(good: st.SearchStrategy[dict]) -> st.SearchStrategy:
    """Half good records, half corrupted or random JSON values."""
    return half(good, corrupted(good) | json_value)


def dump(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def json_lines(good: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    """One JSONL line: half good records; else a corrupted or random record, cut-off JSON, random text or bytes."""
    cut = good.map(json.dumps).flatmap(lambda s: st.integers(0, len(s) - 1).map(lambda i: s[:i]))
    bad = st.one_of(corrupted(good), json_value).map(dump) | st.one_of(cut, st.text(max_size=20)).map(str.encode)
    return half(good.map(dump), bad | st.binary(max_size=20))


@st.composite
def edited(draw, good: st.SearchStrategy[str]) -> str:
    """A good line with up to three edits: a separator (or random text) put in anywhere, or a separator taken out."""
    line = draw(good)
    for _ in range(draw(st.integers(0, 3))):
        at, separator = draw(st.integers(0, len(line))), draw(st.sampled_from(SEPARATORS))
        if draw(st.booleans()):
            line = line[:at] + draw(st.just(separator) | st.text(max_size=4)) + line[at:]
        else:
            line = line.replace(separator, "", 1)
    return line


def text_lines(good: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """One text line: half good; else edited, with its separators and the text between them in another order,
    random text or random bytes."""
    shuffled = good.flatmap(lambda line: st.permutations(re.split(r"(\|\||####| \+ )", line))).map("".join)
    return half(good.map(str.encode), st.one_of(edited(good), shuffled, st.text(max_size=20)).map(str.encode)
                | st.binary(max_size=20))


def lines_file(line: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """One to five lines, each perhaps followed by a blank line (which is no record)."""
    return st.lists(st.tuples(line, blank | st.none()), min_size=1, max_size=5).map(
        lambda pairs: b"".join(text + b"\n" + (b"" if after is None else after + b"\n") for text, after in pairs))


def json_list_file(good: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    """Mostly a JSON list of good, corrupted or random records; else another JSON value or random bytes."""
    return half(st.lists(any_record(good), max_size=4).map(dump), json_value.map(dump) | st.binary(max_size=30))


steps = st.lists(text, max_size=3)
icot_math = st.builds(lambda q, s, a: f"{q}||{' '.join(s)} #### {a}", line_text, st.lists(line_text, max_size=3),
                      number.map(str))
aug_record = st.one_of(st.fixed_dictionaries({"question": text, "answer": number, "steps": steps | text}),
                       st.fixed_dictionaries({"question": text, "answer": number, "cot": text | steps}),
                       st.fixed_dictionaries({"question": text, "answer": st.builds("x <<1+1=2>>2\n#### {}".format,
                                                                                    number)}))
gsm8k_record = st.fixed_dictionaries({"question": text, "answer": st.builds("x <<1+1=2>>2\n#### {}".format, number)})
pal_record = st.fixed_dictionaries({"input": text, "target": number})
coconut_record = st.fixed_dictionaries({"question": text, "steps": steps, "answer": text})


# ------------------------------------------------------------------ every loader, as a task reading one file


@dataclass
class Loader:
    task: str
    split: str
    file: str  # relative to the data directory
    content: st.SearchStrategy[bytes]
    options: Callable[[Path], dict]  # the task's options, given the data directory
    json_list: bool = False

    def load(self, data_dir: Path, on_error: str) -> tuple[list[Example], Records]:
        task = make_task(self.task, self.options(data_dir), on_error)
        return task.load(self.split), task.records


def in_dir(data_dir: Path) -> dict:
    return {"data_dir": str(data_dir)}


def source(name: str) -> Callable[[Path], dict]:
    return lambda data_dir: {"source": str(data_dir / name)}


LOADERS = {
    "jsonl": Loader("jsonl", "train", "d.jsonl", lines_file(json_lines(st.fixed_dictionaries(
        {"question": text, "steps": steps, "answer": text | number}))),
                    lambda data_dir: {"files": {"train": str(data_dir / "d.jsonl")}}),
    "gsm8k-jsonl": Loader("gsm8k", "test", "gsm8k/test.jsonl", lines_file(json_lines(gsm8k_record)),
                          in_dir),
    "gsm8k-icot": Loader("gsm8k", "valid", "gsm8k_aug_icot/valid.txt", lines_file(text_lines(icot_math)),
                         in_dir),
    "gsm8k-aug-txt": Loader("gsm8k-aug", "train", "aug.txt", lines_file(text_lines(icot_math)),
                            source("aug.txt")),
    "gsm8k-aug-jsonl": Loader("gsm8k-aug", "train", "aug.jsonl", lines_file(json_lines(aug_record)),
                              source("aug.jsonl")),
    "gsm8k-aug-json": Loader("gsm8k-aug", "train", "aug.json", json_list_file(aug_record), source("aug.json"),
                             json_list=True),
    "gsm-hard": Loader("gsm-hard", "test", "gsm_hard/gsmhardv2.jsonl", lines_file(json_lines(pal_record)),
                       in_dir),
    "multiarith": Loader("multiarith", "test", "multiarith/mawpsmultiarith.jsonl",
                         lines_file(json_lines(pal_record)), in_dir),
    "svamp": Loader("svamp", "test", "svamp/SVAMP.json", json_list_file(st.fixed_dictionaries(
        {"Body": text, "Question": text, "Answer": number})), in_dir, json_list=True),
    "prosqa": Loader("prosqa", "test", "prosqa/prosqa_test.json", json_list_file(coconut_record), in_dir,
                     json_list=True),
    "prontoqa": Loader("prontoqa", "valid", "prontoqa/prontoqa_valid.json", json_list_file(coconut_record),
                       in_dir, json_list=True),
    "multiplication": Loader("multiplication", "valid", "multiplication_icot/4_by_4_mult/valid.txt",
                             lines_file(text_lines(st.builds(multiplication_line, st.integers(0, 9999),
                                                             st.integers(0, 9999), st.just(4)))),
                             lambda data_dir: {"data_dir": str(data_dir), "digits": 4}),
}
NUMERIC = {"gsm8k-jsonl", "gsm8k-icot", "gsm8k-aug-txt", "gsm8k-aug-jsonl", "gsm8k-aug-json", "gsm-hard",
           "multiarith", "svamp"}


def check_examples(examples: list[Example], numeric: bool) -> None:
    for ex in examples:
        assert isinstance(ex, Example) and isinstance(ex.steps, tuple)
        assert isinstance(ex.question, str) and ex.question.strip() and isinstance(ex.answer, str) and ex.answer
        assert all(isinstance(s, str) and s.strip() for s in ex.steps)
        assert not numeric or parse_number(ex.answer) is not None


def check_error(err: DataError, source: str, n_items: int) -> None:
    """The message names the source and, where it names a line or record, one that exists."""
    message = str(err)
    assert source in message
    where = re.search(rf"{re.escape(source)}, (line|record) (\d+)", message)
    if where is None:
        assert "no examples" in message or "expected a JSON list" in message, message
    else:
        assert (1 if where[1] == "line" else 0) <= int(where[2]) <= n_items, message


def agree(load, source: str, n_items: int, n_records: int | None, numeric: bool, record_word: str) -> None:
    """Strict and skip on the same input: both give Examples or a DataError naming the source; skip keeps exactly
    what strict would have given if that succeeds, and otherwise counts at least one skipped record."""
    try:
        strict, _ = load("strict")
    except DataError as err:
        check_error(err, source, n_items)
        strict = None
    try:
        kept, records = load("skip")
    except DataError as err:
        check_error(err, source, n_items)
        assert f", {record_word} " not in str(err) or "no examples" in str(err)  # a bad record is never fatal
        assert strict is None
        return
    check_examples(kept, numeric)
    if strict is not None:
        assert kept == strict and records.skipped == {}
    else:
        assert records.total_skipped() >= 1 and set(records.skipped) == {source}
    if n_records is not None:
        assert len(kept) + records.total_skipped() == n_records


@pytest.mark.parametrize("name", sorted(LOADERS))
@pytest.mark.filterwarnings("ignore:.*skipped")
@PROPERTY
@given(data=st.data())
def test_every_loader_survives_random_malformed_files(name, data):
    loader = LOADERS[name]
    content = data.draw(loader.content, label="file")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / loader.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        if loader.json_list:
            try:
                value = json.loads(content.decode("utf-8"))
            except ValueError:
                value = None
            n_items = max(len(value) if isinstance(value, list) else 0, content.count(b"\n") + 1)
            n_records = len(value) if isinstance(value, list) else None
        else:
            n_items = content.count(b"\n") + 1
            n_records = sum(1 for raw in content.split(b"\n") if raw.strip())
        agree(lambda on_error: loader.load(Path(tmp), on_error), str(path), n_items, n_records, name in NUMERIC,
              "record" if loader.json_list else "line")


@pytest.mark.filterwarnings("ignore:.*skipped")
@PROPERTY
@given(rows=st.lists(any_record(aug_record), max_size=5))
def test_hub_rows_survive_random_malformed_records(rows):
    """A hub dataset's rows (as ``datasets`` would give them) go through the same policy."""
    source = "org/gsm8k-aug (train split)"
    with mock.patch("rim.data.gsm8k_aug._hub_rows", lambda *args: rows):
        agree(lambda on_error: (lambda t: (t.load("train"), t.records))(
            make_task("gsm8k-aug", {"source": "org/gsm8k-aug"}, on_error)), source, len(rows), len(rows), True,
            "record")


# ------------------------------------------------------------------ strict vs skip, by reason


def test_strict_stops_at_the_first_bad_line_and_skip_counts_by_reason(tmp_path):
    good = json.dumps({"question": "q", "steps": ["s"], "answer": "a"}).encode()
    lines = [good, b'{"question": "q", "steps": []}', b"\n", b'{"question": "\xff", "steps": [], "answer": "1"}',
             b"{oops", good, json.dumps({"question": "q", "steps": [3], "answer": "a"}).encode()]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: missing field 'answer'"):
        read_jsonl(path)
    records = Records("skip")
    with pytest.warns(UserWarning, match=r"d\.jsonl: skipped 4 records \(.*\); first: .*d\.jsonl, line 2: missing"):
        examples = read_jsonl(path, records)
    assert len(examples) == 2
    assert records.skipped == {str(path): {"missing field": 1, "not UTF-8": 1, "not JSON": 1, "wrong type": 1}}
    assert records.total_skipped() == 4


def test_invalid_utf8_is_a_data_error_with_the_line(tmp_path):
    (tmp_path / "svamp").mkdir()
    (tmp_path / "svamp/SVAMP.json").write_bytes(b'[\n{"Body": "a",\n "Question": "\xc3("}]')
    with pytest.raises(DataError, match=r"SVAMP\.json, line 3: not UTF-8"):
        make_task("svamp", {"data_dir": str(tmp_path)}).load("test")
    (tmp_path / "m.txt").write_bytes(b"q||<<1+1=2>> #### 2\n\xfe\n")
    with pytest.raises(DataError, match=r"m\.txt, line 2: not UTF-8 \(byte 0"):
        make_task("gsm8k-aug", {"source": str(tmp_path / "m.txt")}).load("train")


def test_a_byte_order_mark_at_the_start_of_a_file_is_dropped(tmp_path):
    (tmp_path / "svamp").mkdir()
    (tmp_path / "svamp/SVAMP.json").write_bytes(b'\xef\xbb\xbf[{"Body": "a.", "Question": "b?", "Answer": 3}]')
    assert make_task("svamp", {"data_dir": str(tmp_path)}).load("test")[0].answer == "3"
    (tmp_path / "m.txt").write_bytes(b"\xef\xbb\xbfq1||<<1+1=2>> #### 2\nq2||<<2+2=4>> #### 4\n")
    examples = make_task("gsm8k-aug", {"source": str(tmp_path / "m.txt")}).load("train")
    assert [ex.question for ex in examples] == ["q1", "q2"]
    # a bad byte after the mark is reported where it is in the file (the mark counted), on the right line
    (tmp_path / "svamp/SVAMP.json").write_bytes(b'\xef\xbb\xbf[1,\n\xff2]')
    with pytest.raises(DataError, match=r"SVAMP\.json, line 2: not UTF-8 \(byte 7 of the file\)"):
        make_task("svamp", {"data_dir": str(tmp_path)}).load("test")
    (tmp_path / "m.txt").write_bytes(b"\xef\xbb\xbfq1\xff||<<1+1=2>> #### 2\n")
    with pytest.raises(DataError, match=r"m\.txt, line 1: not UTF-8 \(byte 5: b'\\xff'\)"):
        make_task("gsm8k-aug", {"source": str(tmp_path / "m.txt")}).load("train")
    # elsewhere the mark is a character, not dropped
    (tmp_path / "m.txt").write_bytes(b"q1||<<1+1=2>> #### 2\n\xef\xbb\xbfq2||<<2+2=4>> #### 4\n")
    examples = make_task("gsm8k-aug", {"source": str(tmp_path / "m.txt")}).load("train")
    assert [ex.question for ex in examples] == ["q1", "\ufeffq2"]


def test_non_numeric_answers_and_bad_policies_are_refused(tmp_path):
    (tmp_path / "gsm_hard").mkdir()
    (tmp_path / "gsm_hard/gsmhardv2.jsonl").write_text(
        '{"input": "q", "target": 2.5}\n{"input": "q", "target": NaN}\n{"input": "q", "target": true}\n')
    task = make_task("gsm-hard", {"data_dir": str(tmp_path)}, "skip")
    with pytest.warns(UserWarning, match="line 2: target nan is not a number"):
        assert task.load("test") == [Example("q", (), "2.5")]
    assert task.records.skipped == {str(tmp_path / "gsm_hard/gsmhardv2.jsonl"): {"not a number": 1, "wrong type": 1}}
    with pytest.raises(ValueError, match="on_error must be one of strict, skip"):
        make_task("gsm-hard", {}, "lenient")
    (tmp_path / "d.jsonl").write_text('{"question": "q", "steps": [], "answer": NaN}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 1: answer nan is not a number"):
        read_jsonl(tmp_path / "d.jsonl")


def test_a_list_where_a_section_belongs_names_the_section():
    with pytest.raises(ConfigError, match=r"config key 'train': expected a mapping, got list"):
        load_config(None, ["train=[1, 2]"])


# ------------------------------------------------------------------ over-long training examples


def test_over_long_examples_are_skipped_or_have_their_question_cut_from_the_left():
    from rim.models.tiny import word_tokenizer

    task, stages = Task(), [StageConfig(kind="sft", steps=1)]
    tok = word_tokenizer([str(d) for d in range(10)] + ["####"])
    method = make_method(MethodConfig(name="cot"), tok)
    examples = [Example("1 2", ("3",), "4"), Example("1 2 3 4 5 6 7 8", ("9", "8"), "7")]
    short = training_length(method, tokenize_training(method, task, tok, examples[:1], DataConfig(), stages)[0],
                            stages)
    limit = DataConfig(max_length=short + 2)
    with pytest.warns(UserWarning, match=r"skipped 1 records \(too long: 1\); first: example 1 \("):
        kept = tokenize_training(method, task, tok, examples, limit, stages)
    assert [ex.example for ex in kept] == examples[:1]
    assert task.records.skipped == {f"train split (data.max_length={short + 2})": {"too long": 1}}
    cut = DataConfig(max_length=short + 2, too_long="truncate")
    with pytest.warns(UserWarning, match="cut the questions of 1 examples"):
        kept = tokenize_training(method, task, tok, examples, cut, stages)
    assert kept[1].example == Example("6 7 8", ("9", "8"), "7")  # steps and answer whole; the question's end kept
    assert max(training_length(method, ex, stages) for ex in kept) <= short + 2
    with pytest.raises(DataError, match="every training example is longer"), pytest.warns(UserWarning):
        tokenize_training(method, Task(), tok, examples, DataConfig(max_length=3, too_long="truncate"), stages)


# ------------------------------------------------------------------ config ranges and loading without surprises


@pytest.mark.parametrize("override,key", [
    ("data.on_error=lenient", "data.on_error"), ("data.too_long=cut", "data.too_long"),
    ("data.max_length=0", "data.max_length"), ("data.max_train=0", "data.max_train"),
    ("eval.batch_size=0", "eval.batch_size"), ("train.log_every=0", "train.log_every"),
    ("stages.0.steps=0", "stages.0.steps"), ("stages.0.block_weight=cubic", "stages.0.block_weight"),
    ("model.lora_dropout=1.5", "model.lora_dropout"), ("train.max_grad_norm=-1", "train.max_grad_norm"),
    ("train.fsdp=true train.precision=fp16", "train.precision"),
    ("train.fsdp=true method.name=coconut", "train.fsdp"),
    ("eval.cache=static eval.compile=fast", "eval.compile"),
    ("train.compile=fast", "train.compile"), ("train.pad_to_multiple=0", "train.pad_to_multiple"),
    ("train.compile=reduce-overhead", "train.pad_to_multiple"),
    ("train.compile=reduce-overhead train.pad_to_multiple=8 train.fsdp=true", "train.compile"),
    ("train.compile=max-autotune train.pad_to_multiple=8 train.gradient_checkpointing=true", "train.compile"),
    ("train.compile_scope=model", "train.compile_scope"),
    ("train.compile=true train.compile_scope=decoder train.fsdp=true", "train.compile_scope"),
])
def test_config_ranges_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' must be")):
        load_config(None, ["stages.0.epochs=null", "stages.0.steps=1", *override.split()])


def test_an_unquoted_yaml_no_gets_a_hint_to_quote_it():
    with pytest.raises(ConfigError, match=r"'train.precision': expected str, got bool False \(YAML reads unquoted"):
        load_config(None, ["train.precision=no"])
    assert load_config(None, ["train.precision='no'"]).train.precision == "no"


def test_cuda_graph_compile_is_refused_for_coconut():
    with pytest.raises(ConfigError, match=re.escape("'train.compile' must be not a CUDA-graph mode for coconut")):
        load_config(None, ["method.name=coconut", "stages=[{name: l, kind: latent, steps: 1}]",
                           "train.compile=max-autotune", "train.pad_to_multiple=8"])


def test_data_config_defaults_are_safe():
    data = load_config().data
    assert (data.on_error, data.max_length, data.too_long) == ("strict", None, "skip")
    assert load_config().model.trust_remote_code is False


def test_nothing_unpickles_or_runs_remote_code_by_default():
    """No pickle of data; torch.load only with weights_only=True; every from_pretrained of a user-named model passes
    model.trust_remote_code through."""
    for path in SRC.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"\bimport pickle|\bpickle\.load|trust_remote_code=True", source), path
        assert all("weights_only=True" in call for call in re.findall(r"torch\.load\([^)]*\)", source)), path
    for name in ("models/load.py",):  # where runs and models are loaded
        calls = re.findall(r"Auto\w+\.from_pretrained\([^)]*\)", (SRC / name).read_text(encoding="utf-8"))
        assert calls and all("trust_remote_code=" in call for call in calls), name
