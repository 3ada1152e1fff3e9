"""Small generated data sets for the classical tasks, deterministic by seed, so tests and recipes share them offline.

python -m alignkit.testing.synthetic recipes/tiny/data/tasks   # (re)writes <task>.jsonl for every task
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FIRST = "Alice Bob Carol Dave Emma Frank Grace Henry Maria Omar Sofia Yuki Pierre Anna".split()
LAST = "Smith Garcia Chen Khan Muller Rossi Tanaka Dubois".split()
CITIES = "Paris|London|Berlin|New York|Tokyo|Rome|Madrid|Cairo|Lagos|Oslo|San Francisco|Buenos Aires".split("|")
ORGS = "Google|Acme|Acme Corp|Siemens|Nokia|Red Cross|United Nations|Toyota|Bank of Spain|Unilever".split("|")
NER_TEMPLATES = (
    "{PER} works for {ORG} in {LOC} .",
    "{PER} visited {LOC} last year .",
    "{ORG} opened an office in {LOC} .",
    "{PER} and {PER} met in {LOC} .",
    "the {ORG} team hired {PER} on monday .",
    "{PER} lives in {LOC} .",
    "yesterday {PER} called {PER} from {ORG} .",
    "{LOC} is home to {ORG} .",
    "it rained in {LOC} all week .",
    "{PER} said the food was good .",
    "a new report from {ORG} praised {LOC} .",
    "we flew from {LOC} to {LOC} with {PER} .",
)
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")

TOPICS = {
    "sports": (
        ("the team", "the coach", "our striker", "the goalkeeper", "the captain"),
        ("won", "lost", "scored in", "trained for", "played"),
        ("the match", "the final", "the league game", "the tournament", "the derby"),
    ),
    "food": (
        ("the chef", "my aunt", "the bakery", "the waiter", "our cook"),
        ("baked", "served", "tasted", "cooked", "seasoned"),
        ("the soup", "fresh bread", "a spicy curry", "the pasta", "a chocolate cake"),
    ),
    "tech": (
        ("the engineer", "the startup", "our laptop", "the developer", "the server"),
        ("shipped", "crashed during", "updated", "debugged", "released"),
        ("the app", "new software", "the database", "a chip", "the network"),
    ),
}
CLS_LABELS = tuple(TOPICS)
TAILS = ("yesterday", "on monday", "last week", "again", "this morning", "", "in the city", "after lunch")
QUESTIONS = {"live": "Where does {} live?", "work": "Who does {} work for?", "born": "When was {} born?"}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _person(rng: random.Random) -> str:
    first = rng.choice(FIRST)
    return f"{first} {rng.choice(LAST)}" if rng.random() < 0.4 else first


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    """Words + BIO tags (PER, LOC, ORG, multi-word entities included)."""
    rng = random.Random(seed)
    pools = {"PER": lambda: _person(rng), "LOC": lambda: rng.choice(CITIES), "ORG": lambda: rng.choice(ORGS)}
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for word in rng.choice(NER_TEMPLATES).split():
            if word.startswith("{"):
                kind = word[1:-1]
                for j, part in enumerate(pools[kind]().split()):
                    tokens.append(part)
                    tags.append(("B-" if j == 0 else "I-") + kind)
            else:
                tokens.append(word)
                tags.append("O")
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def cls_rows(n: int, seed: int = 0) -> list[dict]:
    """Short sentences labelled with their topic (sports, food, tech)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(CLS_LABELS)
        subjects, verbs, objects = TOPICS[label]
        text = " ".join(
            w for w in (rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(TAILS)) if w
        )
        rows.append({"text": text, "label": label})
    return rows


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """SQuAD-format rows: a context of facts about several people and one question whose answer is in it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        people = rng.sample(FIRST, 4)
        facts = []
        for person in people:
            facts.append((person, "live", rng.choice(CITIES), f"{person} lives in {{}}."))
            facts.append((person, "work", rng.choice(ORGS), f"{person} works for {{}}."))
            facts.append((person, "born", str(rng.randint(1950, 2005)), f"{person} was born in {{}}."))
        rng.shuffle(facts)
        person, relation, answer, _ = rng.choice(facts)
        context, answer_start = "", -1
        for p, r, value, sentence in facts:
            if p == person and r == relation:
                answer_start = len(context) + sentence.index("{}")
            context += sentence.format(value) + " "
        question = QUESTIONS[relation]
        rows.append(
            {
                "id": f"q{i}",
                "question": question.format(person),
                "context": context.strip(),
                "answers": {"text": [answer], "answer_start": [answer_start]},
            }
        )
    return rows


def mlm_rows(n: int, seed: int = 0) -> list[dict]:
    """Raw domain text for masked-LM adaptation: the NER and topic sentences, two per row."""
    rng = random.Random(seed)
    sentences = [" ".join(r["tokens"]) for r in ner_rows(n, seed)] + [r["text"] + " ." for r in cls_rows(n, seed)]
    return [{"text": " ".join(rng.sample(sentences, 2))} for _ in range(n)]


def seq2seq_rows(n: int, seed: int = 0) -> list[dict]:
    """A toy translation: digits to English number words ('4 7 1' -> 'four seven one')."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(rng.randint(2, 5))]
        rows.append({"source": " ".join(map(str, digits)), "target": " ".join(DIGITS[d] for d in digits)})
    return rows


# file name: (generator, rows written for the recipes); qa_large: enough questions for a real encoder (recipes/minilm)
GENERATORS = {
    "ner": (ner_rows, 480),
    "cls": (cls_rows, 360),
    "qa": (qa_rows, 240),
    "mlm": (mlm_rows, 240),
    "seq2seq": (seq2seq_rows, 240),
    "qa_large": (lambda n: qa_rows(n, seed=1), 1500),
}


def write_task_data(out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (generate, n) in GENERATORS.items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in generate(n)))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_task_data(sys.argv[1] if len(sys.argv) > 1 else "recipes/tiny/data/tasks"):
        print(written)
