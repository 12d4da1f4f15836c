"""The seeded invented fact set behind the RAG benchmark: entities, one passage each, and questions.

Every name is built from random syllables so no model can know the facts (closed-book accuracy
should be about 0): people, companies and towns, each with five attributes stated in one short
passage (2-4 sentences, 40-80 words, title = entity name). There is one question per entity,
about one of its attributes (cycled so attributes are balanced); every third question is
*paraphrased* (synonyms, the attribute described indirectly, none of the passage's key verbs),
so lexical overlap with the passage cannot carry retrieval.

Two partitions keep the eval set and the reader adapter's training set (`make_disjoint_set`)
apart for *any* pair of seeds: every invented word of partition 0 starts with a letter the
other partition never starts a word with, the real-word lists (professions, products, dishes)
are split in halves, and years and numbers differ in parity. So no entity name, name word or
answer can be shared; `assert_disjoint` checks it on the data itself.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from adapters.train.data import write_jsonl  # noqa: F401  (the project's JSONL writer; bench.rag_quality imports it here)

EVAL, TRAIN = 0, 1
# Word-initial letters per partition; later syllables may use any onset.
INITIALS = (("b", "d", "f", "k", "m", "p", "t", "v", "z"), ("g", "h", "l", "n", "r", "s", "w", "j", "y"))
ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
          "st", "th", "sh", "vr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "th", "sk")
# Real words; even indices go to partition 0 and odd ones to partition 1 (see `_half`).
PROFESSIONS = ("beekeeper", "glassblower", "cartographer", "locksmith", "violin maker", "tailor",
               "bookbinder", "clockmaker", "blacksmith", "potter", "surveyor", "botanist", "baker",
               "carpenter", "pharmacist", "astronomer", "weaver", "stonemason", "ferryman", "brewer",
               "jeweller", "librarian", "shipwright", "cooper", "beadmaker", "saddler", "chandler",
               "falconer", "glazier", "perfumer", "archivist", "upholsterer")
MATERIALS = ("copper", "wooden", "glass", "woollen", "ceramic", "silver", "leather", "bamboo",
             "brass", "paper", "linen", "iron", "clay", "wicker", "velvet", "granite")
OBJECTS = ("kettles", "lanterns", "umbrellas", "bicycles", "telescopes", "chess sets", "music boxes",
           "typewriters", "compasses", "thermometers", "kites", "toy trains", "sundials", "barometers",
           "hand mirrors", "fountain pens")
FOODS = ("stew", "dumplings", "pie", "flatbread", "soup", "pudding", "pancakes", "sausages",
         "porridge", "fritters", "casserole", "noodles", "tart", "buns", "chowder", "biscuits")
STOPWORDS = {"a", "an", "the", "and", "or", "of", "in", "on", "to", "is", "it", "at", "by"}

# (attribute, literal question templates, paraphrased question templates). Literal ones reuse
# the passage's wording; paraphrased ones avoid its key verbs and nouns.
QUESTIONS: dict[str, list[tuple[str, tuple[str, ...], tuple[str, ...]]]] = {
    "person": [
        ("birthplace", ("In which town was {name} born?",),
         ("Which settlement does {name} originally come from?", "What is the hometown of {name}?")),
        ("employer", ("Which company does {name} work for?",),
         ("Who is the employer of {name}?", "Which firm pays the wages of {name}?")),
        ("birth_year", ("In which year was {name} born?",),
         ("In what year did {name} come into the world?", "What is the birth year of {name}?")),
        ("profession", ("What is the profession of {name}?",),
         ("What trade does {name} practise?", "How does {name} earn a living?")),
        ("pet", ("What is the name of the pet of {name}?",),
         ("What is the animal companion of {name} called?", "What do people call the animal that lives with {name}?")),
    ],
    "company": [
        ("founder", ("Who founded {name}?",),
         ("Which person established the business {name}?", "Who started {name}?")),
        ("headquarters", ("In which town does {name} have its headquarters?",),
         ("Where is {name} based?", "From which settlement is {name} run?")),
        ("founding_year", ("In which year was {name} founded?",),
         ("When did {name} first open its doors?", "In what year was {name} set up?")),
        ("product", ("What is {name} best known for making?",),
         ("What goods does {name} manufacture?", "Which merchandise is {name} famous for?")),
        ("ceo", ("Who is the chief executive of {name}?",),
         ("Who runs {name} today?", "Who is the boss of {name}?")),
    ],
    "place": [
        ("river", ("On the banks of which river is {name} built?",),
         ("What waterway flows past {name}?", "Which stream passes through {name}?")),
        ("mayor", ("Who is the mayor of {name}?",),
         ("Who holds the top civic office in {name}?", "Who governs {name} as its elected head?")),
        ("population", ("About how many inhabitants does {name} have?",),
         ("Roughly how many people live in {name}?", "How large is the population of {name}?")),
        ("region", ("In which region is the town {name}?",),
         ("Which part of the country is {name} located in?", "In what area of the land does one find {name}?")),
        ("dish", ("What is the famous dish of {name}?",),
         ("Which local food is {name} celebrated for?", "What should a visitor to {name} eat?")),
    ],
}

# Passage templates per kind; {first} is the first word of the name. Each states all five
# attributes in 2-4 sentences.
PASSAGES = {
    "person": (
        "{name} is a {profession} who was born in {birth_year} in the town of {birthplace}. After a long "
        "apprenticeship, {first} went to work for {employer}, where colleagues value a careful and patient "
        "manner. At home {first} keeps a pet named {pet}, which follows its owner almost everywhere.",
        "Born in {birth_year} in {birthplace}, {name} trained as a {profession} and now works for {employer}. "
        "{first} shares a small house near the market with a pet named {pet}, and the neighbours say the two "
        "are rarely seen apart on their long evening walks.",
    ),
    "company": (
        "{name} is a company founded in {founding_year} by {founder}. It has its headquarters in the town "
        "of {headquarters} and is best known for making {product}, which are sold mostly through small "
        "shops across the country. "
        "The firm is currently led by its chief executive, {ceo}.",
        "{founder} founded {name} in {founding_year}, and the company still has its headquarters in "
        "{headquarters}. Today it is best known for making {product}. Its chief executive, {ceo}, has kept "
        "the workshop close to its original size and refuses to move it.",
    ),
    "place": (
        "{name} is a town in the {region} region, built on the banks of the {river} River. It has about "
        "{population} inhabitants, and its mayor is {mayor}. Visitors often travel a long way just to taste {dish}, "
        "the famous dish of {name}.",
        "Built on the banks of the {river} River, {name} is a town in the {region} region with about "
        "{population} inhabitants. Its mayor is {mayor}. The famous dish of {name} is {dish}, served warm in "
        "every inn along the old main street.",
    ),
}


@dataclass
class FactSet:
    """Documents (one per entity) and questions (one per entity), plus the seed and partition."""

    seed: int
    partition: int
    documents: list[dict] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)
    entities: list[dict] = field(default_factory=list)


def _half(words: tuple[str, ...], partition: int) -> tuple[str, ...]:
    return words[partition::2]


class _Namer:
    """Invented words, each new within a fact set, starting with the partition's letters."""

    def __init__(self, rng: random.Random, partition: int) -> None:
        self.rng, self.initials, self.used = rng, INITIALS[partition], set()

    def word(self) -> str:
        while True:
            syllables = [self.rng.choice(self.initials) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)]
            for _ in range(self.rng.choice((1, 1, 2))):
                syllables.append(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS))
            w = "".join(syllables)
            # Short words are often real ones ("bat", "done"); unique words keep answers unambiguous.
            if 5 <= len(w) <= 10 and w not in self.used and w not in STOPWORDS:
                self.used.add(w)
                return w.capitalize()

    def person(self) -> str:
        return f"{self.word()} {self.word()}"


def _number(rng: random.Random, lo: int, hi: int, partition: int, step: int = 1) -> int:
    """A value in [lo, hi) on the grid `step` whose parity (in steps) is the partition's."""
    k = rng.randrange(lo // step, hi // step)
    return (k - (k % 2) + partition) * step


def _attributes(kind: str, rng: random.Random, namer: _Namer, partition: int) -> dict[str, str]:
    if kind == "person":
        return {"birthplace": namer.word(), "employer": f"{namer.word()} {rng.choice(('Works', 'Limited'))}",
                "birth_year": str(_number(rng, 1900, 2000, partition)),
                "profession": rng.choice(_half(PROFESSIONS, partition)), "pet": namer.word()}
    if kind == "company":
        product = f"{rng.choice(_half(MATERIALS, partition))} {rng.choice(_half(OBJECTS, partition))}"
        return {"founder": namer.person(), "headquarters": namer.word(),
                "founding_year": str(_number(rng, 1800, 2000, partition)), "product": product,
                "ceo": namer.person()}
    # NOTE: a thousands separator in the passage; the normaliser drops it on both sides.
    return {"river": namer.word(), "mayor": namer.person(),
            "population": f"{_number(rng, 2000, 90000, partition, step=100):,}", "region": namer.word(),
            "dish": f"{namer.word().lower()} {rng.choice(_half(FOODS, partition))}"}


def _name(kind: str, namer: _Namer, rng: random.Random) -> str:
    if kind == "person":
        return namer.person()
    if kind == "company":
        # Suffix words start with both partitions' letters, so they are kept out of answers'
        # disjointness on purpose: "Trading" alone is never an answer.
        return f"{namer.word()} {rng.choice(('Trading', 'Industries', 'Company'))}"
    return namer.word()


def _build(seed: int, num_entities: int, partition: int, prefix: str) -> FactSet:
    rng = random.Random(f"rag-facts/{partition}/{seed}")  # a string seed hashes stably across runs
    namer = _Namer(rng, partition)
    facts = FactSet(seed=seed, partition=partition)
    kinds = ("person", "company", "place")
    counters = {kind: 0 for kind in kinds}
    for i in range(num_entities):
        kind = kinds[i % 3]
        name = _name(kind, namer, rng)
        attrs = _attributes(kind, rng, namer, partition)
        doc_id = f"{prefix}{seed}-{i:04d}"
        text = rng.choice(PASSAGES[kind]).format(name=name, first=name.split()[0], **attrs)
        facts.entities.append({"doc_id": doc_id, "kind": kind, "name": name, "attributes": attrs})
        facts.documents.append({"id": doc_id, "title": name, "text": text})
        counters[kind] += 1
    # One question per entity, in a shuffled order; every third one is paraphrased so any prefix
    # (the bench's --num-questions) keeps the one-third share.
    order = list(range(num_entities))
    rng.shuffle(order)
    attr_turn = {kind: 0 for kind in kinds}
    for qi, ei in enumerate(order):
        ent = facts.entities[ei]
        kind = ent["kind"]
        # Cycle attributes per kind so every attribute gets about a fifth of that kind's questions.
        attribute, literal, paraphrases = QUESTIONS[kind][attr_turn[kind] % 5]
        attr_turn[kind] += 1
        paraphrased = qi % 3 == 2
        template = rng.choice(paraphrases if paraphrased else literal)
        facts.questions.append({"id": f"{prefix}{seed}-q{qi:04d}", "question": template.format(name=ent["name"]),
                                "answer": ent["attributes"][attribute], "doc_id": ent["doc_id"],
                                "attribute": attribute, "paraphrased": paraphrased})
    return facts


def make_fact_set(seed: int = 0, num_entities: int = 500) -> FactSet:
    """The evaluation fact set: `num_entities` entities, documents and questions (partition 0)."""
    return _build(seed, num_entities, EVAL, "fact-s")


def make_disjoint_set(seed2: int = 1, n: int = 500) -> FactSet:
    """A reader-adapter training set (partition 1): shares no name, name word or answer with any eval set."""
    return _build(seed2, n, TRAIN, "train-s")


def name_words(facts: FactSet) -> set[str]:
    """Every word of every invented name (entity names and name-like attribute values)."""
    words = set()
    for ent in facts.entities:
        for value in [ent["name"], *ent["attributes"].values()]:
            words.update(w.lower() for w in value.split() if w[:1].isupper())
    return words - {"works", "limited", "trading", "industries", "company"}


def assert_disjoint(a: FactSet, b: FactSet) -> None:
    """Fail if two fact sets share an entity name, an invented name word or an answer string."""
    names = {e["name"] for e in a.entities} & {e["name"] for e in b.entities}
    assert not names, f"shared entity names: {sorted(names)[:5]}"
    words = name_words(a) & name_words(b)
    assert not words, f"shared name words: {sorted(words)[:5]}"
    answers = ({v.lower() for e in a.entities for v in e["attributes"].values()}
               & {v.lower() for e in b.entities for v in e["attributes"].values()})
    assert not answers, f"shared answers: {sorted(answers)[:5]}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def dump(facts: FactSet, directory: Path, stem: str) -> dict[str, str]:
    """`<stem>_documents.jsonl` ({id, title, text}) and `<stem>_questions.jsonl`; returns the paths."""
    docs = directory / f"{stem}_documents.jsonl"
    questions = directory / f"{stem}_questions.jsonl"
    write_jsonl(docs, ({"id": d["id"], "title": d["title"], "text": d["text"]} for d in facts.documents))
    write_jsonl(questions, facts.questions)
    return {"documents": str(docs), "questions": str(questions)}
