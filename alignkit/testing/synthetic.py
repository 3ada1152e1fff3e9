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


# Sentence-embedding demo: questions about fictional people, each answered by one passage of a fixed corpus (one
# passage per person and fact). The hard negative is a passage about the same person's other facts: lexically the
# closest candidate, and the one a pretrained encoder most often ranks first.
EMBED_FACTS = {
    "city": (
        ("Where does {p} live?", "Which city is {p} based in?", "What is the home town of {p}?"),
        ("{p} lives in {v} and rents a small flat near the station.", "{p} moved to {v} a few years ago."),
        CITIES,
    ),
    "employer": (
        ("Which company does {p} work for?", "Who employs {p}?", "Where does {p} have a job?"),
        ("{p} works for {v} as an engineer.", "{p} joined {v} last spring."),
        ORGS,
    ),
    "pet": (
        ("What pet does {p} keep?", "Which animal lives with {p}?", "Does {p} have a pet?"),
        ("{p} has a {v} that sleeps on the sofa.", "Every morning {p} feeds the {v}."),
        ("cat", "dog", "parrot", "rabbit", "goldfish", "tortoise"),
    ),
    "hobby": (
        ("What does {p} do for fun?", "How does {p} spend the weekend?", "What is the hobby of {p}?"),
        ("On weekends {p} enjoys {v}.", "In the evenings {p} goes {v} with friends."),
        ("chess", "painting", "running", "sailing", "climbing", "cooking", "gardening"),
    ),
    "born": (
        ("When was {p} born?", "In which year was {p} born?", "How old is {p}?"),
        ("{p} was born in {v}.", "{p} celebrated a birthday in {v}, the year of birth."),
        tuple(str(y) for y in range(1950, 2005, 3)),
    ),
}


def embed_rows(n_people: int = 40, seed: int = 0, questions: int = 2) -> list[dict]:
    """Triplets (anchor question, positive passage, negative passage) over a corpus of one passage per person and
    fact: ``questions`` phrasings of each (person, fact), the negative another fact's passage of the same person."""
    rng = random.Random(seed)
    people = rng.sample([f"{f} {last}" for f in FIRST for last in LAST], n_people)
    passages = {}
    for person in people:
        for fact, (_, templates, values) in EMBED_FACTS.items():
            passages[person, fact] = rng.choice(templates).format(p=person, v=rng.choice(values))
    rows = []
    for (person, fact), passage in passages.items():
        others = [f for f in EMBED_FACTS if f != fact]
        for question in rng.sample(EMBED_FACTS[fact][0], questions):
            negative = passages[person, rng.choice(others)]
            rows.append({"anchor": question.format(p=person), "positive": passage, "negative": negative})
    rng.shuffle(rows)
    return rows


def embed_scored_rows(n: int, seed: int = 0) -> list[dict]:
    """Scored pairs over the same corpus: (question, passage, score): 1.0 its own passage, 0.4 another fact of the same
    person, 0.0 a fact of someone else."""
    rng = random.Random(seed)
    rows, triplets = [], embed_rows(seed=seed)
    for t in triplets[:n]:
        kind = rng.random()
        if kind < 0.4:
            rows.append({"sentence1": t["anchor"], "sentence2": t["positive"], "score": 1.0})
        elif kind < 0.7:
            rows.append({"sentence1": t["anchor"], "sentence2": t["negative"], "score": 0.4})
        else:
            other = rng.choice(triplets)["positive"]
            rows.append({"sentence1": t["anchor"], "sentence2": other, "score": 1.0 if other == t["positive"] else 0.0})
    return rows


# file name: (generator, rows written for the recipes); qa_large: enough questions for a real encoder (recipes/minilm)
GENERATORS = {
    "ner": (ner_rows, 480),
    "cls": (cls_rows, 360),
    "qa": (qa_rows, 240),
    "mlm": (mlm_rows, 240),
    "seq2seq": (seq2seq_rows, 240),
    "qa_large": (lambda n: qa_rows(n, seed=1), 1500),
    "embed": (lambda n: embed_rows(n // 10)[:n], 400),
    "embed_scored": (embed_scored_rows, 300),
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
