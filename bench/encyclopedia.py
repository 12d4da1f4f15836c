"""The seeded synthetic encyclopedia behind the kNN-LM effect benchmark (`bench.knn_quality`).

Invented entities (towns, rivers, people, companies, plus a few shared regions, mountains and
seas), every name built from random syllables so the model cannot know them, with one
consistent set of attributes each. Documents (60-150 words, `{"id", "title", "text"}` plus the
in-memory `entities` list of every invented name the text mentions) are one article per entity
and, about as many again, articles on 2-3 related entities ("The river Velmor flows through
Tarsk and Quill..."). A fact is stated in several documents, each time in a different sentence:
no sentence occurs twice in the whole corpus, so no split can leak an eval sentence into train.

`split` holds out ~20 % of the documents such that every invented name in an eval document is
still mentioned by some train document: a datastore built from train knows every eval entity,
in other words. Everything is deterministic per seed (`random.Random`, no global state).
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

DOC_FIELDS = ("id", "title", "text")  # what `alignserve index knn-build --corpus` accepts
MIN_WORDS, MAX_WORDS = 60, 150
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
          "st", "th", "sh", "vr", "q")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ae")
CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "th", "sk", "rn")
PROFESSIONS = ("beekeeper", "glassblower", "cartographer", "locksmith", "tailor", "bookbinder",
               "clockmaker", "blacksmith", "potter", "surveyor", "botanist", "baker", "carpenter",
               "astronomer", "weaver", "stonemason", "ferryman", "brewer", "jeweller", "librarian")
PRODUCTS = ("copper kettles", "glass lanterns", "woollen blankets", "leather saddles", "paper kites",
            "brass compasses", "clay pipes", "silver spoons", "linen shirts", "wicker baskets",
            "iron stoves", "ceramic tiles", "wooden clocks", "velvet hats", "granite millstones")
FISH = ("trout", "eel", "pike", "salmon", "perch", "carp", "grayling", "catfish")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
MONTHS = ("March", "April", "May", "June", "July", "August", "September", "October")
# A sentence may open with one of these so that a fact has many distinct wordings.
LEADS = ("", "Today, ", "According to local records, ", "As many visitors note, ", "It is said that ",
         "Records show that ", "Locals say that ", "In fact, ", "By all accounts, ", "Old maps confirm that ")

# fact kind -> wordings; {s} is the subject, the other fields come from the fact.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "town_region": ("{s} is a town in the {region} region.", "The town of {s} lies in {region}.",
                    "{s} belongs to the region of {region}.", "The region of {region} includes the town of {s}."),
    "town_river": ("{s} lies on the river {river}.", "The river {river} flows past {s}.",
                   "{s} was built on the banks of the {river}.", "The town of {s} stands beside the {river}."),
    "town_pop": ("{s} has about {pop} inhabitants.", "Some {pop} people live in {s}.",
                 "The population of {s} is roughly {pop}."),
    "town_founded": ("{s} was founded in {year}.", "The first houses of {s} were built in {year}.",
                     "The history of {s} goes back to {year}."),
    "town_known": ("{s} is known for its {product}.", "The {product} of {s} are sold far and wide.",
                   "Craftsmen in {s} have long made {product}."),
    "town_mayor": ("The mayor of {s} is {mayor}.", "{mayor} serves as mayor of {s}.",
                   "{s} is governed by its mayor, {mayor}."),
    "town_market": ("{s} holds a market every {day}.", "On {day} the market square of {s} fills with stalls.",
                    "The weekly market of {s} takes place on {day}."),
    "river_source": ("The {s} rises on Mount {mountain}.", "The source of the river {s} lies on Mount {mountain}.",
                     "The river {s} begins high on Mount {mountain}."),
    "river_mouth": ("The {s} empties into the {sea}.", "The river {s} ends in the {sea}.",
                    "At its mouth the {s} meets the {sea}."),
    "river_length": ("The {s} is {km} kilometres long.", "The river {s} runs for {km} kilometres.",
                     "From source to mouth the {s} measures {km} kilometres."),
    "river_towns": ("The river {s} flows through {towns}.", "On its way the {s} passes {towns}.",
                    "The towns along the {s} are {towns}."),
    "river_fish": ("Anglers catch {fish} in the {s}.", "The {s} is rich in {fish}.",
                   "Fishermen on the river {s} mostly land {fish}."),
    "co_hq": ("{s} has its headquarters in {town}.", "{s} is based in {town}.",
              "The head office of {s} stands in {town}."),
    "co_founder": ("{s} was founded by {founder}.", "{founder} started the company {s}.",
                   "The founder of {s} is {founder}."),
    "co_year": ("{s} opened its doors in {year}.", "The company {s} dates from {year}.",
                "{s} was set up in {year}."),
    "co_product": ("{s} makes {product}.", "The main product of {s} is {product}.",
                   "{s} is best known for its {product}."),
    "co_staff": ("{s} employs about {staff} people.", "Around {staff} people work for {s}.",
                 "The staff of {s} numbers some {staff}."),
    "p_born": ("{s} was born in {town}.", "The birthplace of {s} is {town}.", "{s} grew up in {town}."),
    "p_year": ("{s} was born in {year}.", "The birth year of {s} is {year}.", "{s} came into the world in {year}."),
    "p_job": ("{s} works as a {job}.", "By trade {s} is a {job}.", "{s} earns a living as a {job}."),
    "p_employer": ("{s} works for {company}.", "The employer of {s} is {company}.", "{s} is on the staff of {company}."),
}
_LOWER_OK = ("The ", "Some ", "On ", "From ", "At ", "By ", "Around ", "Anglers ", "Fishermen ", "Craftsmen ")


class _Namer:
    """Unique capitalised words from random syllables."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def word(self, lo: int = 2, hi: int = 3) -> str:
        while True:
            w = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS)
                        for _ in range(self.rng.randint(lo, hi))) + self.rng.choice(CODAS)
            if w not in self.used and len(w) >= 4:
                self.used.add(w)
                return w.capitalize()


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _world(rng: random.Random, n: int) -> dict[str, dict[str, dict]]:
    """Entities by kind: name -> attributes (names of other entities where they relate)."""
    namer = _Namer(rng)
    nt, nr, nc = max(2, int(n * 0.30)), max(1, int(n * 0.15)), max(1, int(n * 0.20))
    npp = max(1, n - nt - nr - nc)
    regions = [namer.word() for _ in range(max(3, n // 25))]
    mountains = [namer.word() for _ in range(max(3, n // 30))]
    seas = [f"{namer.word()} {rng.choice(('Sea', 'Lake', 'Bay'))}" for _ in range(max(2, n // 50))]
    towns = [namer.word() for _ in range(nt)]
    rivers = [namer.word() for _ in range(nr)]
    people = [f"{namer.word(1, 2)} {namer.word()}" for _ in range(npp)]
    companies = [f"{namer.word()} {rng.choice(('Works', 'Company', 'Brothers', 'Guild', 'Trading'))}"
                 for _ in range(nc)]
    # Every river gets at least two towns (dealt round robin), so river articles can list them.
    order = towns[:]
    rng.shuffle(order)
    on_river = {t: rivers[i % nr] for i, t in enumerate(order)}
    mayors = dict(zip(towns, rng.sample(people, min(nt, npp))))
    world: dict[str, dict[str, dict]] = {"town": {}, "river": {}, "company": {}, "person": {}}
    for t in towns:
        world["town"][t] = {"region": rng.choice(regions), "river": on_river[t], "mayor": mayors.get(t),
                            "pop": f"{rng.randrange(800, 90000, 100):,}", "year": rng.randint(1050, 1890),
                            "product": rng.choice(PRODUCTS), "day": rng.choice(DAYS)}
    for r in rivers:
        world["river"][r] = {"mountain": rng.choice(mountains), "sea": rng.choice(seas), "km": rng.randint(40, 900),
                             "towns": [t for t in towns if on_river[t] == r], "fish": rng.choice(FISH)}
    for c in companies:
        world["company"][c] = {"town": rng.choice(towns), "founder": rng.choice(people),
                               "year": rng.randint(1820, 2015), "product": rng.choice(PRODUCTS),
                               "staff": rng.randrange(20, 5000, 10)}
    for p in people:
        world["person"][p] = {"town": rng.choice(towns), "year": rng.randint(1930, 2004),
                              "job": rng.choice(PROFESSIONS), "company": rng.choice(companies)}
    return world


def _facts(kind: str, name: str, a: dict) -> list[tuple[str, dict, list[str]]]:
    """(fact kind, template fields, invented names mentioned) about one entity."""
    if kind == "town":
        out = [("town_region", {"region": a["region"]}, [a["region"]]),
               ("town_river", {"river": a["river"]}, [a["river"]]),
               ("town_pop", {"pop": a["pop"]}, []), ("town_founded", {"year": a["year"]}, []),
               ("town_known", {"product": a["product"]}, []), ("town_market", {"day": a["day"]}, [])]
        if a["mayor"]:
            out.append(("town_mayor", {"mayor": a["mayor"]}, [a["mayor"]]))
    elif kind == "river":
        towns = a["towns"][:4]
        out = [("river_source", {"mountain": a["mountain"]}, [a["mountain"]]),
               ("river_mouth", {"sea": a["sea"]}, [a["sea"]]), ("river_length", {"km": a["km"]}, []),
               ("river_towns", {"towns": _join(towns)}, towns), ("river_fish", {"fish": a["fish"]}, [])]
    elif kind == "company":
        out = [("co_hq", {"town": a["town"]}, [a["town"]]), ("co_founder", {"founder": a["founder"]}, [a["founder"]]),
               ("co_year", {"year": a["year"]}, []), ("co_product", {"product": a["product"]}, []),
               ("co_staff", {"staff": f"{a['staff']:,}"}, [])]
    else:
        out = [("p_born", {"town": a["town"]}, [a["town"]]), ("p_year", {"year": a["year"]}, []),
               ("p_job", {"job": a["job"]}, []), ("p_employer", {"company": a["company"]}, [a["company"]])]
    return [(k, {"s": name, **f}, [name, *names]) for k, f, names in out]


class _Writer:
    """Renders facts into sentences never used before anywhere in the corpus."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def sentence(self, kind: str, fields: dict) -> str | None:
        options = [(lead, t) for lead in LEADS for t in TEMPLATES[kind]]
        # Plain wordings first (shuffled), so the first mention of a fact reads naturally.
        self.rng.shuffle(options)
        options.sort(key=lambda o: o[0] != "")
        for lead, template in options:
            body = template.format(**fields)
            text = lead + (body[0].lower() + body[1:] if lead and body.startswith(_LOWER_OK) else body)
            if text not in self.used:
                self.used.add(text)
                return text
        return None  # every wording of this fact is taken: state it no more


def _document(writer: _Writer, rng: random.Random, facts: list, opening: list) -> tuple[str, list[str]]:
    """Sentences for `opening` facts first, then shuffled `facts`, up to a random 70-140 words."""
    target = rng.randint(70, 140)
    rest = facts[:]
    rng.shuffle(rest)
    sentences, names, words = [], [], 0
    for kind, fields, mentioned in [*opening, *rest]:
        if words >= target:
            break
        s = writer.sentence(kind, fields)
        if s is None or words + len(s.split()) > MAX_WORDS:
            continue
        sentences.append(s)
        names += [m for m in mentioned if m not in names]
        words += len(s.split())
    return " ".join(sentences), names


def make_encyclopedia(seed: int = 0, num_entities: int = 300) -> list[dict]:
    """One article per entity, then ~1.3 articles per entity on it and 1-2 related entities."""
    rng = random.Random(f"encyclopedia-{seed}")
    world = _world(rng, num_entities)
    writer = _Writer(rng)
    facts = {(kind, name): _facts(kind, name, a) for kind, ents in world.items() for name, a in ents.items()}
    drafts: list[tuple[str, list]] = []
    for (kind, name), own in facts.items():
        # An article: its own facts, padded with facts of the entities it names (e.g. its river).
        named = dict.fromkeys(m for _, _, ms in own for m in ms[1:])  # ordered, unlike a set
        related = [f for m in named for key in _keys(world, m) for f in facts[key]]
        rng.shuffle(related)
        drafts.append((name, [own[:1], own[1:] + related[:8]]))
    for kind, name in rng.sample(sorted(facts), k=len(facts)) * 2:
        if len(drafts) >= int(2.3 * len(facts)):
            break
        linked = sorted({m for _, _, ms in facts[(kind, name)] for m in ms[1:] if _keys(world, m)})
        if not linked:
            continue
        picks = rng.sample(linked, k=min(len(linked), rng.randint(1, 2)))
        group = facts[(kind, name)] + [f for m in picks for key in _keys(world, m) for f in facts[key]]
        drafts.append((_join([name, *picks]), [[], group]))
    docs, titles = [], Counter()
    for title, (opening, pool) in drafts:
        text, names = _document(writer, rng, pool, opening)
        if len(text.split()) < MIN_WORDS:
            continue  # its facts were used up by earlier documents
        titles[title] += 1
        docs.append({"id": f"enc-s{seed}-{len(docs):04d}",
                     "title": title if titles[title] == 1 else f"{title} ({titles[title]})",
                     "text": text, "entities": names})
    return docs


def _keys(world: dict, name: str) -> list[tuple[str, str]]:
    return [(kind, name) for kind in world if name in world[kind]]


def sentences(text: str) -> list[str]:
    """The sentences of a document (each ends with '.' followed by a space or the end)."""
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def split(docs: list[dict], seed: int = 0, held_out: float = 0.2) -> tuple[list[dict], list[dict]]:
    """(train, eval): ~held_out of the documents, each only if its names stay mentioned in train."""
    rng = random.Random(f"encyclopedia-split-{seed}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    left = Counter(m for d in docs for m in d["entities"])  # mentions still in train
    target, held = round(held_out * len(docs)), set()
    for i in order:
        if len(held) >= target:
            break
        if all(left[m] >= 2 for m in docs[i]["entities"]):
            held.add(i)
            left.subtract(docs[i]["entities"])
    train = [d for i, d in enumerate(docs) if i not in held]
    evals = [d for i, d in enumerate(docs) if i in held]
    seen = {s for d in train for s in sentences(d["text"])}
    # The generator never repeats a sentence; this guards that promise for any future edit.
    assert not any(s in seen for d in evals for s in sentences(d["text"])), "an eval sentence is in train"
    return train, evals


def write_jsonl(path: Path, docs: Iterable[dict], fields: tuple[str, ...] | None = DOC_FIELDS) -> Path:
    """One JSON object per line; `fields=None` keeps every key (e.g. `entities` for eval)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d if fields is None else {k: d[k] for k in fields}, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
