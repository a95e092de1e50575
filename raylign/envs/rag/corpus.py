"""Documents, chunks and question/answer records for the retrieval environment.

Three corpora: a document file (``load_corpus``: id, text, optional metadata), the answers of a MedQuAD-shaped
QA file (``corpus_from_qa``), or invented facts (``synthetic_corpus``) that no model can know without searching.

MedQuAD: ``doc_id`` is NOT a document key. In shared/data/medquad/qa.jsonl 16,407 rows carry 12,136 distinct
doc_ids (they are per-source question numbers: "0000013_2-1" is the first question of seven different CancerGov
pages), while every (doc_id, answer) pair is distinct, and 348 rows share one boiler-plate answer text. So each
distinct answer text is one document, with the content id ``ans-<sha256(answer)[:12]>``; the gold document of a
question is its answer's document (``answers_as_gold``). Whitespace runs in answers are collapsed in documents.

Chunking cuts character windows of ``chunk_chars`` that start every ``chunk_chars - overlap`` characters, moved to
whitespace where one lies in the last half of the window (a window never splits a word when it can avoid it);
the next window starts ``overlap`` characters before the cut, moved back to a word start within a quarter window.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylign.config import DatasetConfig
from raylign.envs.data import DataError, load_records

_WS = re.compile(r"\s")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    text: str


@dataclass(frozen=True)
class QARecord:
    id: str
    question: str
    answer: str
    doc_id: str  # the gold document


def chunk_spans(text: str, chunk_chars: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) character windows covering ``text``; consecutive windows share >= ``overlap`` characters."""
    if not 0 <= overlap < chunk_chars:
        raise ValueError(f"chunk overlap {overlap} must be in [0, chunk_chars={chunk_chars})")
    spans: list[tuple[int, int]] = []
    start, n = 0, len(text)
    while start < n:
        end = min(start + chunk_chars, n)
        if end < n and not _WS.match(text[end]):
            cut = max((m.start() for m in _WS.finditer(text, start + chunk_chars // 2, end)), default=-1)
            end = cut if cut > start else end
        spans.append((start, end))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        # Back to a word start if one is near (the overlap grows a little).
        if not (_WS.match(text[nxt - 1]) or _WS.match(text[nxt])):
            lo = max(start + 1, nxt - chunk_chars // 4)
            nxt = max((m.end() for m in _WS.finditer(text, lo - 1, nxt - 1)), default=nxt)
        start = nxt
    return spans


def chunk_documents(docs: list[Document], chunk_chars: int, overlap: int) -> list[Chunk]:
    """Every document cut into windows; chunk ids are ``f"{doc_id}#{k}"``."""
    return [Chunk(f"{d.id}#{k}", d.id, d.text[s:e])
            for d in docs for k, (s, e) in enumerate(chunk_spans(d.text, chunk_chars, overlap))]


def _require(record: dict[str, Any], key: str, source: str, row: int) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        present = ", ".join(sorted(k for k, v in record.items() if v is not None))
        what = "missing" if value is None else "empty"
        raise DataError(f"{source}: row {row}: {what} field '{key}' (fields: {present})")
    if not isinstance(value, str | int):
        raise DataError(f"{source}: row {row}: field '{key}' must be a string (got {type(value).__name__})")
    return str(value)


def _read(path: str, what: str) -> tuple[list[dict[str, Any]], str]:
    local = Path(path).expanduser()
    if local.suffix in (".json", ".jsonl", ".parquet") and not local.exists():
        raise DataError(f"{path}: file not found ({what})")
    try:
        return load_records(DatasetConfig(path=path), split="train")
    except DataError as e:
        raise DataError(f"{what}: {e}") from None


def load_corpus(path: str) -> list[Document]:
    """Documents from a jsonl/json/parquet file or a hub id; fields id, text and optional metadata (a mapping)."""
    records, source = _read(path, "rag.corpus_path")
    docs, seen = [], {}
    for row, rec in enumerate(records):
        doc_id, text = _require(rec, "id", source, row), _require(rec, "text", source, row)
        metadata = rec.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise DataError(f"{source}: row {row}: field 'metadata' must be a mapping (got {type(metadata).__name__})")
        if doc_id in seen:
            raise DataError(f"{source}: row {row}: field 'id' {doc_id!r} repeats row {seen[doc_id]}")
        seen[doc_id] = row
        docs.append(Document(doc_id, text, metadata))
    if not docs:
        raise DataError(f"{source}: no documents (rag.corpus_path)")
    return docs


def load_qa(path: str, limit: int | None = None, seed: int = 0) -> list[QARecord]:
    """Question/answer records (fields question, answer, doc_id; qid optional), ``doc_id`` as in the file.

    With ``limit`` below the number of rows, a seeded sample of ``limit`` rows (kept in file order): the first
    rows of MedQuAD all come from one source. Record ids are ``f"{qid}/{row}"`` (MedQuAD repeats qids).
    """
    records, source = _read(path, "dataset.path")
    rows = list(range(len(records)))
    if limit is not None and limit < len(rows):
        rows = sorted(random.Random(seed).sample(rows, limit))
    out = []
    for row in rows:
        rec = records[row]
        question, answer = _require(rec, "question", source, row), _require(rec, "answer", source, row)
        doc_id = _require(rec, "doc_id", source, row)
        out.append(QARecord(f"{rec.get('qid', 'q')}/{row}", question, answer, doc_id))
    return out


def answer_doc_id(answer: str) -> str:
    return "ans-" + hashlib.sha256(answer.encode()).hexdigest()[:12]


def corpus_from_qa(records: list[QARecord]) -> list[Document]:
    """One document per distinct answer text (see the module docstring); metadata lists the file's doc_ids."""
    by_id: dict[str, tuple[str, list[str]]] = {}
    for r in records:
        text, sources = by_id.setdefault(answer_doc_id(r.answer), (" ".join(r.answer.split()), []))
        if r.doc_id not in sources:
            sources.append(r.doc_id)
    return [Document(i, text, {"source_doc_ids": ",".join(s)}) for i, (text, s) in by_id.items()]


def answers_as_gold(records: list[QARecord]) -> list[QARecord]:
    """The same questions with the gold document set to their answer's document (corpus_from_qa ids)."""
    return [QARecord(r.id, r.question, r.answer, answer_doc_id(r.answer)) for r in records]


# Synthetic corpus: invented entities, so an answer cannot come from the model's memory. Towns, professions,
# emblem parts and kinds are drawn from small shared pools and some base names are reused with another kind
# ("the Velkari Institute" and "the Velkari Foundry"), so documents overlap and retrieval has distractors.
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s", "sk", "st",
           "t", "th", "tr", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "k", "m", "x", "nd"]
_KINDS = ["Institute", "Observatory", "Guild", "Library", "Academy", "Foundry", "Conservatory", "Museum",
          "Brewery", "Shipyard", "Orchard", "Archive"]
_PROFESSIONS = ["chemist", "cartographer", "weaver", "astronomer", "glassblower", "shipwright", "botanist",
                "clockmaker", "physician", "stonemason", "linguist", "brewer"]
_MATERIALS = ["copper", "silver", "jade", "amber", "iron", "ivory", "bronze", "glass", "obsidian", "pewter"]
_ANIMALS = ["heron", "lynx", "otter", "falcon", "stag", "beetle", "salamander", "wolf", "moth", "tortoise",
            "crane", "hare"]
_COLOURS = ["indigo", "saffron", "crimson", "ash-grey", "emerald", "ochre", "violet", "teal"]
_COLLECTIONS = ["clockwork maps", "pressed ferns", "glass lenses", "river charts", "bell moulds", "star catalogues",
                "dyed silks", "salt samples", "ship models", "herbal manuscripts", "brass astrolabes", "carved masks"]
_NUM_TOWNS = 30

# question kind -> (template, answer attribute); {name}, {founder} and {profession} come from the entity.
_QUESTIONS = {
    "year": ("In what year was the {name} founded?", "year"),
    "founder": ("Who founded the {name}?", "founder"),
    "town": ("In which town was the {name} founded?", "town"),
    "emblem": ("What is the emblem of the {name}?", "emblem"),
    "collection": ("What is the {name} best known for collecting?", "collection"),
    "by_founder": ("What emblem did the {profession} {founder} choose for the institution they founded?", "emblem"),
}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).title()


def _unique_word(rng: random.Random, taken: set[str], syllables: int) -> str:
    while (word := _word(rng, syllables)) in taken:
        pass
    taken.add(word)
    return word


def _entity(rng: random.Random, taken: set[str], bases: list[str], towns: list[str]) -> dict[str, str]:
    if bases and rng.random() < 0.15:  # a distractor: an existing base name with another kind
        base = rng.choice(bases)
    else:
        base = _unique_word(rng, taken, rng.choice([2, 3]))
        bases.append(base)
    names = {e for e in taken if " " in e}
    while (name := f"{base} {rng.choice(_KINDS)}") in names:
        pass
    taken.add(name)
    founder = f"{_unique_word(rng, taken, 2)} {_unique_word(rng, taken, 2)}"
    town, moved_to = rng.sample(towns, 2)
    return {"name": name, "year": str(rng.randint(1601, 1949)), "town": town, "founder": founder,
            "profession": rng.choice(_PROFESSIONS), "emblem": f"{rng.choice(_MATERIALS)} {rng.choice(_ANIMALS)}",
            "colour": rng.choice(_COLOURS), "collection": rng.choice(_COLLECTIONS), "moved_to": moved_to,
            "moved_year": str(rng.randint(1950, 2020))}


def _document_text(rng: random.Random, e: dict[str, str], rival: dict[str, str], guest: dict[str, str]) -> str:
    article = "an" if e["emblem"][0] in "aeiou" else "a"
    rest = [f"Its emblem is {article} {e['emblem']}.",
            f"Its members wear {e['colour']} sashes on feast days.",
            f"The {e['name']} is best known for its collection of {e['collection']}.",
            f"In {e['moved_year']} it moved to {e['moved_to']}, where it still stands.",
            f"It has long been a rival of the {rival['name']}.",
            f"A portrait of the {guest['profession']} {guest['founder']} hangs in its hall."]
    rng.shuffle(rest)
    first = (f"The {e['name']} was founded in {e['year']} in the town of {e['town']} "
             f"by {e['profession']} {e['founder']}.")
    return " ".join([first, *rest])


def synthetic_corpus(num_facts: int, seed: int) -> tuple[list[Document], list[QARecord]]:
    """``num_facts`` invented entities: one document each and one question whose answer is in that document.

    Every document also names two other entities (a rival institution, a portrait of another founder), so the
    subject of a question appears in distractor documents too, and keyword match alone is not enough.
    """
    rng = random.Random(seed)
    taken: set[str] = set()
    towns = [_unique_word(rng, taken, 2) for _ in range(_NUM_TOWNS)]
    bases: list[str] = []
    entities = [_entity(rng, taken, bases, towns) for _ in range(num_facts)]
    docs, qa = [], []
    for k, e in enumerate(entities):
        rival, guest = (entities[(k + rng.randrange(1, num_facts)) % num_facts] for _ in range(2))
        doc_id = f"syn-{k:05d}"
        docs.append(Document(doc_id, _document_text(rng, e, rival, guest), dict(e)))
        template, attribute = _QUESTIONS[rng.choice(sorted(_QUESTIONS))]
        qa.append(QARecord(f"synq-{k:05d}", template.format(**e), e[attribute], doc_id))
    return docs, qa
