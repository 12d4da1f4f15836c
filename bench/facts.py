"""The shipped fact table behind the DoLa factual multiple-choice suite, and its seeded items.

Facts a 135M model plausibly knows (methods.md §8, DoLa (b)): capitals of well-known countries,
chemical symbols, authors of famous books, and day-of-week / month arithmetic (computed, so
always right). `mc_items(seed)` turns them into ≈ 300 questions with one true answer and three
distractors of the same kind (other capitals, other symbols, other authors, other days or
months), options shuffled by the seed. Scoring them is bench/dola_quality.py's job.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"), ("Ireland", "Dublin"), ("the Netherlands", "Amsterdam"),
    ("Belgium", "Brussels"), ("Austria", "Vienna"), ("Switzerland", "Bern"), ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"), ("Hungary", "Budapest"), ("Greece", "Athens"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Russia", "Moscow"),
    ("Ukraine", "Kyiv"), ("Turkey", "Ankara"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Ghana", "Accra"), ("China", "Beijing"),
    ("Japan", "Tokyo"), ("South Korea", "Seoul"), ("India", "New Delhi"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Afghanistan", "Kabul"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Cuba", "Havana"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Iceland", "Reykjavik"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"),
    ("Qatar", "Doha"), ("Uruguay", "Montevideo"), ("Ecuador", "Quito"), ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"), ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
)
SYMBOLS = (
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"),
    ("oxygen", "O"), ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"),
    ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"),
    ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"),
    ("silver", "Ag"), ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"), ("tin", "Sn"), ("uranium", "U"),
    ("nickel", "Ni"), ("cobalt", "Co"), ("titanium", "Ti"), ("chromium", "Cr"), ("manganese", "Mn"),
    ("platinum", "Pt"), ("iodine", "I"), ("bromine", "Br"), ("boron", "B"), ("beryllium", "Be"),
    ("radon", "Rn"), ("krypton", "Kr"), ("xenon", "Xe"), ("tungsten", "W"), ("barium", "Ba"),
    ("plutonium", "Pu"), ("arsenic", "As"), ("selenium", "Se"),
)
AUTHORS = (
    ("Hamlet", "William Shakespeare"), ("Macbeth", "William Shakespeare"),
    ("Pride and Prejudice", "Jane Austen"), ("Emma", "Jane Austen"), ("1984", "George Orwell"),
    ("Animal Farm", "George Orwell"), ("War and Peace", "Leo Tolstoy"), ("Anna Karenina", "Leo Tolstoy"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("Moby-Dick", "Herman Melville"), ("Don Quixote", "Miguel de Cervantes"), ("the Odyssey", "Homer"),
    ("the Iliad", "Homer"), ("Harry Potter and the Philosopher's Stone", "J. K. Rowling"),
    ("The Hobbit", "J. R. R. Tolkien"), ("The Lord of the Rings", "J. R. R. Tolkien"),
    ("Oliver Twist", "Charles Dickens"), ("A Christmas Carol", "Charles Dickens"),
    ("Great Expectations", "Charles Dickens"), ("The Adventures of Tom Sawyer", "Mark Twain"),
    ("Adventures of Huckleberry Finn", "Mark Twain"), ("Frankenstein", "Mary Shelley"),
    ("Dracula", "Bram Stoker"), ("On the Origin of Species", "Charles Darwin"),
    ("To Kill a Mockingbird", "Harper Lee"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Jane Eyre", "Charlotte Bronte"), ("Wuthering Heights", "Emily Bronte"), ("Les Miserables", "Victor Hugo"),
    ("The Divine Comedy", "Dante Alighieri"), ("The Catcher in the Rye", "J. D. Salinger"),
    ("Brave New World", "Aldous Huxley"), ("Alice's Adventures in Wonderland", "Lewis Carroll"),
    ("The Adventures of Sherlock Holmes", "Arthur Conan Doyle"), ("Little Women", "Louisa May Alcott"),
    ("The Raven", "Edgar Allan Poe"), ("Gulliver's Travels", "Jonathan Swift"),
    ("Robinson Crusoe", "Daniel Defoe"), ("Treasure Island", "Robert Louis Stevenson"),
    ("The Jungle Book", "Rudyard Kipling"), ("The Time Machine", "H. G. Wells"),
    ("The War of the Worlds", "H. G. Wells"), ("Around the World in Eighty Days", "Jules Verne"),
    ("Twenty Thousand Leagues Under the Seas", "Jules Verne"), ("The Communist Manifesto", "Karl Marx"),
    ("A Brief History of Time", "Stephen Hawking"), ("The Little Prince", "Antoine de Saint-Exupery"),
    ("Charlie and the Chocolate Factory", "Roald Dahl"), ("Of Mice and Men", "John Steinbeck"),
    ("The Grapes of Wrath", "John Steinbeck"),
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
# How many computed questions of each kind the default set draws (the fact lists are used whole).
NUM_DAY_ITEMS, NUM_MONTH_ITEMS = 60, 70
NUM_OPTIONS = 4
CATEGORIES = ("capital", "symbol", "author", "day", "month")


@dataclass(frozen=True)
class MCItem:
    """One question, its options (one true, shuffled) and the true option's index."""

    category: str
    question: str
    options: tuple[str, ...]
    answer: int


def _cycle_question(names: tuple[str, ...], unit: str, start: int, offset: int, after: bool) -> tuple[str, str]:
    step = offset if after else -offset
    word = NUMBER_WORDS[offset] if offset < len(NUMBER_WORDS) else str(offset)
    kind = "day of the week" if unit == "day" else "month"
    return (f"What {kind} is {word} {unit}{'s' if offset > 1 else ''} {'after' if after else 'before'} "
            f"{names[start]}?", names[(start + step) % len(names)])


def _arithmetic(names: tuple[str, ...], unit: str, count: int, rng: random.Random) -> list[tuple[str, str]]:
    combos = [(s, o, a) for s in range(len(names)) for o in range(1, len(names)) for a in (True, False)]
    return [_cycle_question(names, unit, *c) for c in rng.sample(combos, min(count, len(combos)))]


def _items(category: str, qa: list[tuple[str, str]], pool: list[str], rng: random.Random) -> list[MCItem]:
    out = []
    for question, answer in qa:
        options = rng.sample([a for a in pool if a != answer], NUM_OPTIONS - 1) + [answer]
        rng.shuffle(options)
        out.append(MCItem(category, question, tuple(options), options.index(answer)))
    return out


def mc_items(seed: int = 0, per_category: int | None = None) -> list[MCItem]:
    """The multiple-choice set: every listed fact plus the drawn arithmetic questions (≈ 300),
    or `per_category` items of each kind (the quick size), distractors and order from `seed`."""
    rng = random.Random(seed)
    qa = {
        "capital": [(f"What is the capital of {c}?", a) for c, a in CAPITALS],
        "symbol": [(f"What is the chemical symbol for {e}?", s) for e, s in SYMBOLS],
        "author": [(f"Who wrote {b}?", a) for b, a in AUTHORS],
        "day": _arithmetic(DAYS, "day", NUM_DAY_ITEMS, rng),
        "month": _arithmetic(MONTHS, "month", NUM_MONTH_ITEMS, rng),
    }
    pools = {"capital": [a for _, a in CAPITALS], "symbol": [s for _, s in SYMBOLS],
             "author": [a for _, a in AUTHORS], "day": list(DAYS), "month": list(MONTHS)}
    items = []
    for category in CATEGORIES:
        chosen = qa[category] if per_category is None else rng.sample(qa[category], per_category)
        items.extend(_items(category, chosen, sorted(set(pools[category])), rng))
    return items
