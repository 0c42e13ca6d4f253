"""Generators for the training splits of ProsQA and ProntoQA, in the exact text format of Coconut's JSON files.

The valid/test files ship (``rim.data.benchmarks``); the training splits do not, so they are regenerated here.
Both generators are seeded (``random.Random(seed)``) and deterministic, and need no files.

ProsQA (Hao et al. 2024, "Coconut", App. A.2, Algorithm 1)
    A random DAG is grown node by node. Nodes 0 and 1 carry labels 1 and 2; every new node draws
    ``poisson(1.5)`` parents from one of three candidate pools (p=0.35: nodes that are not descendants of
    node 1; p=0.35: not descendants of node 0; p=0.30: all nodes), weighting candidates by
    ``1.5 * depth + 1`` (depth = longest path from a parentless node), and its label is the bitwise OR of
    its parents' labels (1: below node 0 only, 2: below node 1 only, 3: both, 0: neither). Nodes without
    parents are people (names), the others made-up concepts (``...pus`` words). The root is node 0 or 1;
    the target is a leaf reachable from the root only, at the largest shortest-path distance among such
    leaves, which must be 3 to 6; the negative option is a random leaf reachable from the other node only.
    Question: one sentence per edge (``Every X is a Y.`` / ``Name is a Y.``) in random order, then
    ``Is Root a A or B?`` (options in random order). Steps: the edges of a shortest root-to-target path
    (one chosen at random if several). Answer: ``Root is a target.``
    Differences from the original (tuned so that the shipped valid+test statistics are matched: about 23
    nodes, 36 edges, 2.6 people, steps 3/4/5/6 in 41/44/13/2%): N is drawn uniformly from 19..28 and
    isolated nodes are dropped; a draw of 0 parents is redrawn with probability 0.75 (plain Algorithm 1
    gives 4.3 people per graph instead of 2.6); "depth" is our reading of ``depth_to_root``; the root is
    the person whose exclusive leaves lie deeper (the other one with probability 0.1; the shipped files
    have 71% deeper / 25% tie / 4% shallower). The target/negative rule is inferred from the shipped files
    (all 800 satisfy it), not from released code.

ProntoQA (Saparov & He 2023, 5-hop fictional ontologies with distractors, as used by Coconut)
    The structure is the one every shipped problem has: a chain of five concepts c1 -> ... -> c5; each ci
    has one property and one extra child concept (with a property); c5 has two extra children, one with a
    property; a distractor concept d (with a property and one child without property) of which the entity
    is also a member; and an isolated concept f carrying c5's property with the opposite polarity. That
    is 14 distinct concepts, 11 "is a" rules and 12 property rules, properties from 11 distinct property
    families. Rules use ``Every X is ...`` / ``Each X is ...`` / ``Xpuses are ...`` (1/4, 1/4, 1/2);
    they come in random order, then ``N is a c1.`` and ``N is a d.`` (random order), then
    ``True or false: N is [not] P.`` where P is c5's property. Steps: ``N is a ci. <rule ci -> ci+1>``
    for i = 1..4, ``N is a c5. <property rule of c5>``, ``N is [not] P.``; answer ``True``/``False``.
    Differences from the original generator: this is a re-implementation of the shipped structure, not
    of asaparov/prontoqa's code; the negation rates (chain 0.26, side/distractor 0.31, c5 0.46, query
    0.5) are the shipped files' frequencies; the family list is the 13 families seen in the files.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

from rim.data.tasks import Example

# ------------------------------------------------------------------ vocabularies (as in the shipped files)

PROSQA_NAMES = ("Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver", "Polly",
                "Rex", "Sally", "Sam", "Stella", "Tom", "Wren")
PROSQA_CONCEPTS = ("bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus", "gorpus",
                   "grimpus", "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus", "lempus", "lorpus",
                   "numpus", "quimpus", "rempus", "rompus", "rorpus", "scrompus", "shumpus", "sterpus",
                   "storpus", "terpus", "timpus", "tumpus", "vumpus", "worpus", "wumpus", "yerpus", "yimpus",
                   "yumpus", "zhorpus", "zumpus")

PROSQA_NODES = (19, 28)  # N of Algorithm 1, drawn uniformly (before isolated nodes are dropped)
PROSQA_REDRAW_ZERO = 0.75
PROSQA_SHALLOW_ROOT = 0.1

PRONTOQA_NAMES = ("Alex", "Fae", "Max", "Polly", "Rex", "Sally", "Sam", "Stella", "Wren")
PRONTOQA_CONCEPTS = ("brimpus", "dumpus", "gorpus", "grimpus", "impus", "jompus", "lempus", "lorpus", "numpus",
                     "rompus", "shumpus", "sterpus", "tumpus", "vumpus", "wumpus", "yumpus", "zumpus")
PRONTOQA_FAMILIES = (
    ("blue", "red", "brown", "orange"), ("small", "large"), ("metallic", "wooden", "luminous", "liquid"),
    ("transparent", "opaque"), ("nervous", "happy", "feisty", "shy"), ("hot", "cold", "temperate"),
    ("sour", "sweet", "bitter", "spicy"), ("muffled", "loud", "melodic", "discordant"),
    ("slow", "fast", "moderate"), ("windy", "sunny", "overcast", "rainy", "snowy"),
    ("floral", "fruity", "earthy"), ("bright", "dull"), ("kind", "mean", "angry", "amenable", "aggressive"),
)

# ------------------------------------------------------------------ ProsQA


def _poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _n_parents(rng: random.Random) -> int:
    """poisson(1.5), with a zero redrawn with probability PROSQA_REDRAW_ZERO (fewer parentless nodes)."""
    k = _poisson(rng, 1.5)
    while k == 0 and rng.random() < PROSQA_REDRAW_ZERO:
        k = _poisson(rng, 1.5)
    return k


def _weighted_sample(rng: random.Random, items: list[int], weights: list[float], k: int) -> list[int]:
    """k distinct items, drawn one at a time with probability proportional to weight."""
    items, weights, out = list(items), list(weights), []
    for _ in range(min(k, len(items))):
        x = rng.random() * sum(weights)
        i = 0
        while i < len(items) - 1 and x >= weights[i]:
            x -= weights[i]
            i += 1
        out.append(items.pop(i))
        weights.pop(i)
    return out


def _prosqa_graph(rng: random.Random, n_nodes: int) -> list[tuple[int, int]]:
    """Algorithm 1: the edge list of a DAG over nodes 0..n_nodes-1."""
    labels = {0: 1, 1: 2}
    depth = {0: 0, 1: 0}
    groups: dict[int, list[int]] = {0: [], 1: [0], 2: [1], 3: []}
    edges: list[tuple[int, int]] = []
    for idx in range(2, n_nodes):
        n_in = _n_parents(rng)
        u = rng.random()
        if u <= 0.35:
            cands = sorted(groups[0] + groups[1])
        elif u <= 0.7:
            cands = sorted(groups[0] + groups[2])
        else:
            cands = list(range(idx))
        parents = _weighted_sample(rng, cands, [depth[c] * 1.5 + 1 for c in cands], n_in)
        label = 0
        for p in parents:
            label |= labels[p]
            edges.append((p, idx))
        labels[idx] = label
        depth[idx] = 1 + max((depth[p] for p in parents), default=-1)
        groups[label].append(idx)
    return edges


def _reach(children: dict[int, list[int]], start: int) -> set[int]:
    seen, stack = {start}, [start]
    while stack:
        for v in children.get(stack.pop(), []):
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


def _bfs(children: dict[int, list[int]], start: int) -> dict[int, int]:
    dist, queue = {start: 0}, [start]
    for u in queue:
        for v in children.get(u, []):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def _make_prosqa(rng: random.Random) -> Example | None:
    edges = _prosqa_graph(rng, rng.randint(*PROSQA_NODES))
    used = sorted({x for e in edges for x in e})
    children: dict[int, list[int]] = {}
    has_parent = set()
    for a, b in edges:
        children.setdefault(a, []).append(b)
        has_parent.add(b)
    people = [v for v in used if v not in has_parent]
    concepts = [v for v in used if v in has_parent]
    if 0 not in children or 1 not in children or len(people) > len(PROSQA_NAMES) \
            or len(concepts) > len(PROSQA_CONCEPTS):
        return None
    # the root: the person (node 0 or 1) whose own leaves lie deeper, the other one with probability
    # PROSQA_SHALLOW_ROOT (ties at random); its farthest own leaf must be 3 to 6 steps away
    reach = [_reach(children, 0), _reach(children, 1)]
    dists = [_bfs(children, 0), _bfs(children, 1)]
    leaves = [[v for v in sorted(reach[i] - reach[1 - i]) if v not in children] for i in (0, 1)]
    if not leaves[0] or not leaves[1]:
        return None
    fars = [max(dists[i][v] for v in leaves[i]) for i in (0, 1)]
    order = sorted((0, 1), key=lambda i: (-fars[i], rng.random()))
    root = order[1] if rng.random() < PROSQA_SHALLOW_ROOT else order[0]
    other, dist, far = 1 - root, dists[root], fars[root]
    leaves_mine, leaves_theirs = leaves[root], leaves[other]
    if not 3 <= far <= 6:
        return None
    target = rng.choice([v for v in leaves_mine if dist[v] == far])
    negative = rng.choice(leaves_theirs)
    # a random shortest path, walked back from the target
    parents: dict[int, list[int]] = {}
    for a, b in edges:
        parents.setdefault(b, []).append(a)
    path = [target]
    while path[-1] != root:
        path.append(rng.choice(sorted(p for p in parents[path[-1]] if dist.get(p) == dist[path[-1]] - 1)))
    path.reverse()

    name = dict(zip(people, rng.sample(PROSQA_NAMES, len(people))))
    name.update(zip(concepts, rng.sample(PROSQA_CONCEPTS, len(concepts))))

    def sentence(a: int, b: int) -> str:
        return f"{name[a]} is a {name[b]}." if a in people else f"Every {name[a]} is a {name[b]}."

    facts = [sentence(a, b) for a, b in edges]
    rng.shuffle(facts)
    options = [name[target], name[negative]]
    rng.shuffle(options)
    question = " ".join(facts) + f" Is {name[root]} a {options[0]} or {options[1]}?"
    steps = tuple(sentence(a, b) for a, b in zip(path, path[1:]))
    return Example(question, steps, f"{name[root]} is a {name[target]}.")


def _distinct(make, rng: random.Random, n: int) -> list[Example]:
    """Draw ``make(rng)`` until ``n`` problems with distinct questions (a draw may return None: rejected)."""
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < n:
        ex = make(rng)
        if ex is not None and ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
    return out


def generate_prosqa(n: int, seed: int) -> list[Example]:
    """``n`` ProsQA problems (distinct questions), deterministic in ``seed``."""
    return _distinct(_make_prosqa, random.Random(f"prosqa-{seed}"), n)


# ------------------------------------------------------------------ ProntoQA


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(concept: str) -> str:
    return concept + "es"


def _rule(rng: random.Random, subject: str, obj: str, negated: bool, is_concept: bool) -> str:
    """One ontology rule in one of the three surface forms."""
    form = rng.random()
    if form < 0.5:
        rhs = _plural(obj) if is_concept else obj
        return f"{_plural(subject).capitalize()} are {'not ' if negated else ''}{rhs}."
    quant = "Every" if form < 0.75 else "Each"
    rhs = f"{_article(obj)} {obj}" if is_concept else obj
    return f"{quant} {subject} is {'not ' if negated else ''}{rhs}."


def _make_prontoqa(rng: random.Random) -> Example:
    c = rng.sample(PRONTOQA_CONCEPTS, 14)
    chain, sides, (c5_kid_a, c5_kid_b), distractor, d_kid, isolated = c[:5], c[5:9], c[9:11], c[11], c[12], c[13]
    families = rng.sample(PRONTOQA_FAMILIES, 11)
    props = [rng.choice(f) for f in families]
    entity = rng.choice(PRONTOQA_NAMES)

    sub_rules = {}  # (a, b) -> sentence
    prop_rules = {}  # concept -> sentence
    polarity = {}
    for i in range(4):
        sub_rules[(chain[i], chain[i + 1])] = _rule(rng, chain[i], chain[i + 1], False, True)
        sub_rules[(chain[i], sides[i])] = _rule(rng, chain[i], sides[i], False, True)
    for kid in (c5_kid_a, c5_kid_b):
        sub_rules[(chain[4], kid)] = _rule(rng, chain[4], kid, False, True)
    sub_rules[(distractor, d_kid)] = _rule(rng, distractor, d_kid, False, True)
    with_props = [(x, 0.26) for x in chain[:4]] + [(x, 0.31) for x in sides + [c5_kid_a, distractor]] \
        + [(chain[4], 0.46)]
    for (concept, p_neg), prop in zip(with_props, props):
        polarity[concept] = rng.random() < p_neg
        prop_rules[concept] = _rule(rng, concept, prop, polarity[concept], False)
    query_prop = props[-1]
    prop_rules[isolated] = _rule(rng, isolated, query_prop, not polarity[chain[4]], False)

    rules = list(sub_rules.values()) + list(prop_rules.values())
    rng.shuffle(rules)
    memberships = [f"{entity} is {_article(x)} {x}." for x in (chain[0], distractor)]
    rng.shuffle(memberships)
    query_neg = rng.random() < 0.5
    question = " ".join(rules + memberships) + f" True or false: {entity} is {'not ' if query_neg else ''}{query_prop}."
    steps = [f"{entity} is {_article(chain[i])} {chain[i]}. {sub_rules[(chain[i], chain[i + 1])]}" for i in range(4)]
    steps.append(f"{entity} is {_article(chain[4])} {chain[4]}. {prop_rules[chain[4]]}")
    steps.append(f"{entity} is {'not ' if polarity[chain[4]] else ''}{query_prop}.")
    return Example(question, tuple(steps), "True" if query_neg == polarity[chain[4]] else "False")


def generate_prontoqa(n: int, seed: int) -> list[Example]:
    """``n`` ProntoQA problems (distinct questions), deterministic in ``seed``."""
    return _distinct(_make_prontoqa, random.Random(f"prontoqa-{seed}"), n)


# ------------------------------------------------------------------ statistics

_PROSQA_Q = re.compile(r"Is ([A-Z][a-z]+) a ([a-z]+) or ([a-z]+)\?$")
_SENTENCE = re.compile(r"(?<=[.?:]) ")


def _template(sentence: str) -> str:
    """A sentence with names <n>, concepts <c> (plural <cs>) and properties <p> replaced by placeholders."""
    s = re.sub(r"^True or false: ", "TF: ", sentence)
    s = re.sub(r"\b[A-Za-z][a-z]*puses\b", "<cs>", s)
    s = re.sub(r"\b[a-z]+pus\b", "<c>", s)
    s = re.sub(r"\b(?!Every\b|Each\b|Is\b|TF\b)[A-Z][a-z]+\b", "<n>", s)
    s = re.sub(r"\b(is|are) (not )?(?!an?\b|not\b)[a-z]+(?=[.?])", lambda m: f"{m[1]} {m[2] or ''}<p>", s)
    return s


def logic_stats(examples: list[Example], reference: list[Example] | None = None) -> dict:
    """Statistics for comparing problem sets (e.g. generated vs shipped).

    Keys: ``n``; ``steps_mean/min/max`` and ``steps_hist`` (fractions); ``question_words_mean``;
    ``question_sentences_mean``; ``answer_true`` (ProntoQA: fraction ``True``) or ``answer_first`` (ProsQA:
    fraction whose answer is the first option); ``templates`` (fraction of question sentences per template);
    ``vocabulary`` (sorted words). With ``reference``: ``vocab_jaccard`` and ``vocab_coverage`` (fraction of
    this vocabulary that the reference also uses).
    """
    if not examples:
        raise ValueError("logic_stats needs at least one example")
    steps = [len(ex.steps) for ex in examples]
    templates: Counter = Counter()
    vocab: set[str] = set()
    first = true = 0
    for ex in examples:
        sentences = _SENTENCE.split(ex.question)
        templates.update(_template(s) for s in sentences if s != "True or false:")
        vocab.update(" ".join((ex.question, ex.answer) + ex.steps).replace(".", " ").replace("?", " ")
                     .replace(":", " ").split())
        true += ex.answer == "True"
        m = _PROSQA_Q.search(ex.question)
        if m:
            first += ex.answer == f"{m[1]} is a {m[2]}."
    n_sent = sum(templates.values())
    out = {
        "n": len(examples),
        "steps_mean": sum(steps) / len(steps), "steps_min": min(steps), "steps_max": max(steps),
        "steps_hist": {k: v / len(steps) for k, v in sorted(Counter(steps).items())},
        "question_words_mean": sum(len(ex.question.split()) for ex in examples) / len(examples),
        "question_sentences_mean": n_sent / len(examples),
        "templates": {k: v / n_sent for k, v in templates.most_common()},
        "vocabulary": sorted(vocab),
    }
    if all(ex.answer in ("True", "False") for ex in examples):
        out["answer_true"] = true / len(examples)
    else:
        out["answer_first"] = first / len(examples)
    if reference is not None:
        ref = set(logic_stats(reference)["vocabulary"])
        out["vocab_jaccard"] = len(vocab & ref) / len(vocab | ref)
        out["vocab_coverage"] = len(vocab & ref) / len(vocab)
    return out
