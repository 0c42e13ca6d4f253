"""Generated ProsQA / ProntoQA training problems match the shipped valid+test files in format, statistics and logic."""

from __future__ import annotations

import re
from collections import deque

import pytest

from rim.data.benchmarks import CoconutLogic, ProntoQA
from rim.data.logic_gen import generate_prontoqa, generate_prosqa, logic_stats

N = 300



@pytest.fixture(scope="module")
def prosqa(data_dir):
    return CoconutLogic(str(data_dir)).load("valid") + CoconutLogic(str(data_dir)).load("test"), generate_prosqa(N, 0)


@pytest.fixture(scope="module")
def prontoqa(data_dir):
    return ProntoQA(str(data_dir)).load("valid") + ProntoQA(str(data_dir)).load("test"), generate_prontoqa(N, 0)


# ------------------------------------------------------------------ formats (regexes derived from the shipped files)

NAME, CONCEPT = r"[A-Z][a-z]+", r"[a-z]+pus"
PROSQA_FACT = rf"(?:Every {CONCEPT}|{NAME}) is a {CONCEPT}\."
PROSQA_QUESTION = re.compile(rf"(?:{PROSQA_FACT} )+Is {NAME} a {CONCEPT} or {CONCEPT}\?")
PROSQA_STEP = re.compile(PROSQA_FACT)
PROSQA_ANSWER = re.compile(rf"{NAME} is a {CONCEPT}\.")

PRONTO_RULE = (rf"(?:(?:Every|Each) {CONCEPT} is (?:not )?(?:an? {CONCEPT}|[a-z]+)"
               rf"|[A-Z][a-z]+puses are (?:not )?[a-z]+)\.")
PRONTO_MEMBER = rf"{NAME} is an? {CONCEPT}\."
PRONTO_QUESTION = re.compile(rf"(?:{PRONTO_RULE} ){{23}}(?:{PRONTO_MEMBER} ){{2}}True or false: {NAME} is (?:not )?[a-z]+\.")
PRONTO_STEP = re.compile(rf"{PRONTO_MEMBER} {PRONTO_RULE}")
PRONTO_LAST = re.compile(rf"{NAME} is (?:not )?[a-z]+\.")


def _article_ok(text: str) -> bool:
    return all((art == "an") == (word[0] in "aeiou") for art, word in re.findall(r"\b(an?) ([a-z]+)", text))


def _prosqa_format(ex) -> bool:
    return (PROSQA_QUESTION.fullmatch(ex.question) is not None and PROSQA_ANSWER.fullmatch(ex.answer) is not None
            and 3 <= len(ex.steps) <= 6 and all(PROSQA_STEP.fullmatch(s) for s in ex.steps))


def _pronto_format(ex) -> bool:
    return (PRONTO_QUESTION.fullmatch(ex.question) is not None and ex.answer in ("True", "False")
            and len(ex.steps) == 6 and all(PRONTO_STEP.fullmatch(s) for s in ex.steps[:5])
            and PRONTO_LAST.fullmatch(ex.steps[5]) is not None and _article_ok(ex.question)
            and all(_article_ok(s) for s in ex.steps))


# ------------------------------------------------------------------ independent checkers


def _prosqa_solve(ex) -> str:
    """Breadth-first search over the question's facts; the answer names the one option the subject reaches."""
    body, query = ex.question.rsplit(". Is ", 1)
    subject, a, b = re.fullmatch(r"(\w+) a (\w+) or (\w+)\?", query).groups()
    children: dict[str, list[str]] = {}
    facts = set()
    for sent in (body + ".").split(". "):
        m = re.fullmatch(r"(?:Every )?(\w+) is a (\w+)\.?", sent)
        children.setdefault(m[1], []).append(m[2])
        facts.add(sent.rstrip(".") + ".")
    dist, queue = {subject: 0}, deque([subject])
    while queue:
        u = queue.popleft()
        for v in children.get(u, []):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    reached = [x for x in (a, b) if x in dist]
    assert len(reached) == 1, f"exactly one option must be reachable: {ex.question}"
    target = reached[0]
    # the steps are a shortest chain of question facts from the subject to the answer
    assert len(ex.steps) == dist[target]
    node = subject
    for step in ex.steps:
        assert step in facts
        m = re.fullmatch(r"(?:Every )?(\w+) is a (\w+)\.", step)
        assert m[1] == node
        node = m[2]
    assert node == target
    return f"{subject} is a {target}."


def _singular(word: str) -> str:
    return word[:-2] if word.endswith("puses") else word


def _pronto_solve(ex) -> str:
    """Forward chaining: all concepts the entity belongs to, then the property the query asks about."""
    body, query = ex.question.split(" True or false: ")
    isa: dict[str, list[str]] = {}
    props: dict[str, list[tuple[str, bool]]] = {}
    member = []
    sentences = set()
    for sent in re.split(r"(?<=\.) ", body):
        sentences.add(sent)
        s = sent.rstrip(".")
        m = (re.fullmatch(r"(?:Every|Each) (\w+) is (not )?(?:an? )?(\w+)", s)
             or re.fullmatch(r"([A-Z]\w+puses) are (not )?(\w+)", s))
        if m:
            subj, neg, obj = _singular(m[1].lower()), bool(m[2]), _singular(m[3])
            if obj.endswith("pus"):
                assert not neg
                isa.setdefault(subj, []).append(obj)
            else:
                props.setdefault(subj, []).append((obj, neg))
            continue
        m = re.fullmatch(r"([A-Z][a-z]+) is an? (\w+)", s)
        member.append((m[1], m[2]))
    entity, qneg, qprop = re.fullmatch(r"([A-Z][a-z]+) is (not )?(\w+)\.", query).groups()
    assert {e for e, _ in member} == {entity}
    kinds, stack = set(), [c for _, c in member]
    while stack:
        c = stack.pop()
        if c not in kinds:
            kinds.add(c)
            stack.extend(isa.get(c, []))
    derived = {neg for c in kinds for p, neg in props.get(c, []) if p == qprop}
    assert len(derived) == 1, f"the query property must follow, without contradiction: {ex.question}"
    # the steps quote the question's rules and end with the derived fact
    for step in ex.steps[:5]:
        fact, rule = re.fullmatch(r"(.+?\.) (.+\.)", step).groups()
        assert rule in sentences
    assert ex.steps[5] == f"{entity} is {'not ' if derived.pop() else ''}{qprop}."
    return "True" if ex.steps[5] == f"{entity} is {'not ' if qneg else ''}{qprop}." else "False"


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("gen", [generate_prosqa, generate_prontoqa])
def test_deterministic_per_seed(gen):
    assert gen(40, 7) == gen(40, 7)
    assert gen(40, 7) != gen(40, 8)
    assert gen(10, 7) == gen(40, 7)[:10]
    assert len({ex.question for ex in gen(200, 1)}) == 200


@pytest.mark.parametrize("task", ["prosqa", "prontoqa"])
def test_format_and_vocabulary_match_the_shipped_files(task, request):
    shipped, generated = request.getfixturevalue(task)
    matches = _prosqa_format if task == "prosqa" else _pronto_format
    assert all(matches(ex) for ex in shipped)
    assert all(matches(ex) for ex in generated)
    ship_vocab = set(logic_stats(shipped)["vocabulary"])
    assert set(logic_stats(generated)["vocabulary"]) <= ship_vocab


def _close_stats(shipped, generated, hist_tol):
    a, b = logic_stats(shipped), logic_stats(generated, reference=shipped)
    assert (a["steps_min"], a["steps_max"]) == (b["steps_min"], b["steps_max"])
    assert abs(a["steps_mean"] - b["steps_mean"]) < 0.15
    for k in set(a["steps_hist"]) | set(b["steps_hist"]):
        assert abs(a["steps_hist"].get(k, 0) - b["steps_hist"].get(k, 0)) < hist_tol, k
    assert abs(a["question_words_mean"] / b["question_words_mean"] - 1) < 0.05
    key = "answer_true" if "answer_true" in a else "answer_first"
    assert abs(a[key] - b[key]) < 0.08 and abs(b[key] - 0.5) < 0.08
    for k in set(a["templates"]) | set(b["templates"]):
        assert abs(a["templates"].get(k, 0) - b["templates"].get(k, 0)) < 0.03, k
    assert b["vocab_coverage"] == 1.0 and b["vocab_jaccard"] > 0.9
    return a, b


def test_prosqa_statistics(prosqa):
    a, b = _close_stats(*prosqa, hist_tol=0.08)
    assert abs(a["question_sentences_mean"] - b["question_sentences_mean"]) < 2.5


def test_prontoqa_statistics(prontoqa):
    a, b = _close_stats(*prontoqa, hist_tol=0.001)
    assert a["question_sentences_mean"] == b["question_sentences_mean"] == 26


def test_prosqa_reasoning(prosqa):
    shipped, generated = prosqa
    for ex in shipped + generated:  # the checker agrees with all shipped answers, so it can judge ours
        assert _prosqa_solve(ex) == ex.answer, ex.question


def test_prontoqa_reasoning(prontoqa):
    shipped, generated = prontoqa
    for ex in shipped + generated:
        assert _pronto_solve(ex) == ex.answer, ex.question


def test_no_overlap_with_shipped(prosqa, prontoqa):
    for shipped, generated in (prosqa, prontoqa):
        assert not {ex.question for ex in shipped} & {ex.question for ex in generated}


def test_logic_stats_keys(prontoqa):
    s = logic_stats(prontoqa[1][:5])
    assert {"n", "steps_mean", "steps_hist", "question_words_mean", "templates", "answer_true"} <= set(s)
    with pytest.raises(ValueError):
        logic_stats([])
