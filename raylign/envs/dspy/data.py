"""Questions for the AutoDSPy env: math and multi-hop QA, mixed and shuffled, as the seed mixes GSM8K and HotpotQA.

The policy sees only the question (``question_problem`` wraps it in ``action_prompt``); the context, when a
question has one, goes to the task model that runs the chosen pipeline.

Offline (``offline_questions``, no files): the arith env's generated problems (its seed-independent fact split)
and 2-hop questions over the synthetic RAG corpus. Each 2-hop question names a subject institution X; X's
document names the bridge (its rival Y, or the founder F of the portrait in its hall, who founded Z), and the
answer is an attribute in Y's or Z's document and in no other document of the context. Context: X's document
first, then the hop-2 document and one distractor (never one that mentions X) in seeded order, as "title: text"
paragraphs. Entities go to train or test by a hash of their name that ignores the seed, and a question is kept
only when X, the hop-2 entity and the distractor are all of its split: no entity is in both splits, for any
seeds or sizes.

Files (``file_questions``): GSM8K and HotpotQA (list-of-pairs context as in the local sample, or the hub's
``{"title": [...], "sentences": [[...]]}``). A hub id or a path with ``{split}`` has splits of its own (the
HotpotQA hub has no labelled test split: ``test`` reads ``validation``); a plain file is cut into train/test
by a hash of each row's ``id`` (else its question), 30% test, again ignoring the seed so that no row changes
sides between runs. The seed only shuffles.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raylign.config import DatasetConfig
from raylign.envs.arith import generate as generate_arith
from raylign.envs.answers import extract_gsm8k_truth
from raylign.envs.data import DataError, _is_local, field, load_records
from raylign.envs.dspy.actions import DEFAULT_MODULES, SIGNATURES, action_prompt
from raylign.envs.gsm8k import HUB_CONFIG as GSM8K_HUB_CONFIG, HUB_ID as GSM8K_HUB_ID
from raylign.envs.rag.corpus import Document, synthetic_corpus
from raylign.types import Problem

KINDS = ("math", "multihop")
SPLITS = ("train", "test")
HOTPOT_HUB_ID, HOTPOT_HUB_CONFIG = "hotpotqa/hotpot_qa", "distractor"
TEST_FRACTION = 0.3  # plain files only
_HUB_SPLITS = {"gsm8k": {"train": "train", "test": "test"}, "hotpotqa": {"train": "train", "test": "validation"}}

# template -> (relation X's document names, question about X, attribute of the hop-2 institution)
HOPS: dict[str, tuple[str, str, str]] = {
    "rival_town": ("rival", "In which town was the rival of the {name} founded?", "town"),
    "rival_year": ("rival", "In what year was the rival of the {name} founded?", "year"),
    "rival_founder": ("rival", "Who founded the rival of the {name}?", "founder"),
    "rival_collection": ("rival", "What is the rival of the {name} best known for collecting?", "collection"),
    "portrait_institution": ("portrait", "Which institution was founded by the person whose portrait hangs in "
                                         "the hall of the {name}?", "name"),
    "portrait_year": ("portrait", "In what year did the person whose portrait hangs in the hall of the {name} "
                                  "found their institution?", "year"),
    "portrait_emblem": ("portrait", "What is the emblem of the institution founded by the person whose portrait "
                                    "hangs in the hall of the {name}?", "emblem"),
}
# The corpus writes "It has long been a rival of the <Base Kind>." and "A portrait of the <profession> <First
# Last> hangs in its hall."; its names are letters only.
_BRIDGES = {"rival": re.compile(r"It has long been a rival of the (\w+ \w+)\."),
            "portrait": re.compile(r"A portrait of the \w+ (\w+ \w+) hangs in its hall\.")}


@dataclass(frozen=True)
class Question:
    """One question, its ground truth, the context the task model reads (None: none) and where it came from."""

    id: str
    question: str
    answer: str
    context: str | None
    kind: str  # "math" | "multihop"
    source: str  # "file:row", "arith:<id>" or "synthetic:..."

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"question kind {self.kind!r}; known: {', '.join(KINDS)}")


def question_problem(q: Question, modules: Sequence[str] = DEFAULT_MODULES,
                     signatures: Sequence[str] = SIGNATURES) -> Problem:
    """The policy's prompt for ``q`` (question only); the context travels in ``meta`` for the task model."""
    meta = {"question": q.question, "context": q.context, "kind": q.kind, "source": q.source}
    return Problem(q.id, action_prompt(q.question, modules, signatures), q.answer, meta)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"AutoDSPy questions have splits {SPLITS}, not {split!r}")


def _side(key: str) -> str:
    """"train" or "test" for a key, the same for every seed and process."""
    return "test" if int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 1000 < 1000 * TEST_FRACTION \
        else "train"


# ---------------------------------------------------------------------------------------------- offline


def _entity_side(name: str) -> str:
    return SPLITS[hashlib.sha256(f"raylign-dspy-entity|{name}".encode()).digest()[0] % 2]


def _multihop(docs: list[Document], split: str, count: int, seed: int) -> list[Question]:
    """Up to ``count`` 2-hop questions (one per subject, in corpus order) whose entities are all in ``split``."""
    by_name = {d.metadata["name"]: d for d in docs}
    by_founder = {d.metadata["founder"]: d for d in docs}
    ours = [d for d in docs if _entity_side(d.metadata["name"]) == split]
    rng = random.Random(f"raylign-dspy-multihop|{seed}|{split}|{len(docs)}")
    out = []
    for x in ours:
        hop2 = {}
        for relation, pattern in _BRIDGES.items():
            m = pattern.search(x.text)
            if m is None:
                raise RuntimeError(f"synthetic document {x.id} has no {relation} sentence: {x.text!r}")
            y = (by_name if relation == "rival" else by_founder)[m.group(1)]
            if _entity_side(y.metadata["name"]) == split:
                hop2[relation] = y
        # Only hops whose answer is not already in X's document (X can share a town or a collection with Y).
        templates = [t for t in sorted(HOPS) if HOPS[t][0] in hop2
                     and hop2[HOPS[t][0]].metadata[HOPS[t][2]] not in x.text]
        if not templates:
            continue
        template = rng.choice(templates)
        relation, text, attribute = HOPS[template]
        y, name, answer = hop2[relation], x.metadata["name"], hop2[relation].metadata[attribute]
        others = [d for d in ours if d.id not in (x.id, y.id) and name not in d.text and answer not in d.text]
        if not others:
            continue
        alike = [d for d in others if set(d.metadata["name"].split()) & set(name.split())]  # shares base or kind
        distractor = rng.choice(alike or others)
        rest = [y, distractor]
        rng.shuffle(rest)
        context = "\n\n".join(f"{d.metadata['name']}: {d.text}" for d in [x, *rest])
        out.append(Question(f"multihop-{split}-{x.id}", text.format(name=name), answer, context,
                            "multihop", f"synthetic:{template}:{x.id}>{y.id}+{distractor.id}"))
        if len(out) == count:
            break
    return out


def offline_questions(split: str, num_math: int, num_multihop: int, seed: int, difficulty: int) -> list[Question]:
    """``num_math`` arith problems of ``difficulty`` and ``num_multihop`` synthetic 2-hop questions, shuffled.

    Needs no files. The synthetic corpus grows (4x the questions asked for, doubling) until the split has
    enough questions; it is built from ``seed``, so the result is deterministic in all five arguments.
    """
    _check_split(split)
    if num_math < 0 or num_multihop < 0:
        raise ValueError(f"question counts must be >= 0 (num_math={num_math}, num_multihop={num_multihop})")
    out = []
    if num_math:
        for i, (question, _, _, answer, _) in enumerate(generate_arith(difficulty, split, num_math, seed)):
            qid = f"arith-l{difficulty}-{split}-{i}"
            out.append(Question(qid, question, str(answer), None, "math", f"arith:{qid}"))
    num_facts = max(16, 4 * num_multihop)
    while num_multihop:
        multihop = _multihop(synthetic_corpus(num_facts, seed)[0], split, num_multihop, seed)
        if len(multihop) == num_multihop:
            out += multihop
            break
        if num_facts > 64 * num_multihop:  # about 3 in 8 entities give a question: this is never reached
            raise RuntimeError(f"{num_facts} synthetic facts gave only {len(multihop)} {split} 2-hop questions")
        num_facts *= 2
    random.Random(f"raylign-dspy-offline|{seed}|{split}").shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------ files


def _text(record: dict[str, Any], key: str, source: str, row: int) -> str:
    value = field(record, key, source, row).strip()
    if not value:
        raise DataError(f"{source}: row {row}: empty field '{key}'")
    return value


def _gsm8k(record: dict[str, Any], source: str, row: int, split: str) -> Question:
    solution = _text(record, "answer", source, row)
    truth = extract_gsm8k_truth(solution)
    if truth is None:
        tail = solution.rpartition("####")[2].strip()
        why = f"'#### {tail}' is not a number" if "####" in solution else "has no '#### <answer>' line"
        raise DataError(f"{source}: row {row}: field 'answer' {why}")
    return Question(f"gsm8k-{split}-{row}", _text(record, "question", source, row), truth, None, "math",
                    f"{source}:{row}")


def _paragraphs(context: Any, where: str) -> list[tuple[Any, Any]]:
    """(title, sentences) pairs of a HotpotQA context: ``[[title, [s, ...]], ...]`` or the hub's dict of lists."""
    if isinstance(context, dict):
        titles, sentences = context.get("title"), context.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise DataError(f"{where}: a mapping context needs lists 'title' and 'sentences' of equal length")
        return list(zip(titles, sentences))
    shape = "[[title, [sentences]], ...] or {'title': [...], 'sentences': [...]}"
    if not isinstance(context, list):
        raise DataError(f"{where}: expected {shape}, got {type(context).__name__}")
    bad = next((k for k, p in enumerate(context) if not (isinstance(p, list | tuple) and len(p) == 2)), None)
    if bad is not None:
        raise DataError(f"{where}: expected {shape}; paragraph {bad} is not a [title, sentences] pair")
    return [tuple(p) for p in context]


def _hotpotqa(record: dict[str, Any], source: str, row: int, split: str) -> Question:
    question, answer = _text(record, "question", source, row), _text(record, "answer", source, row)
    where = f"{source}: row {row}: field 'context'"
    if record.get("context") is None:
        field(record, "context", source, row)  # raises the missing-field error
    paragraphs = []
    for k, (title, sentences) in enumerate(_paragraphs(record["context"], where)):
        if not isinstance(title, str) or not isinstance(sentences, list) \
                or not all(isinstance(s, str) for s in sentences):
            raise DataError(f"{where}: paragraph {k} needs a string title and a list of string sentences")
        paragraphs.append(f"{title}: " + " ".join(s.strip() for s in sentences if s.strip()))
    if not paragraphs:
        raise DataError(f"{where}: no paragraphs")
    return Question(f"hotpotqa-{split}-{row}", question, answer, "\n\n".join(paragraphs), "multihop",
                    f"{source}:{row}")


_READERS = {"gsm8k": (_gsm8k, GSM8K_HUB_ID, GSM8K_HUB_CONFIG),
            "hotpotqa": (_hotpotqa, HOTPOT_HUB_ID, HOTPOT_HUB_CONFIG)}


def _read(name: str, path: str, split: str, limit: int | None) -> list[Question]:
    reader, hub_id, hub_config = _READERS[name]
    # The same local/hub test as load_records, so "has splits of its own" agrees with what it reads.
    own_splits = not _is_local(path) or "{split}" in path
    read_split = split if _is_local(path) else _HUB_SPLITS[name][split]
    records, source = load_records(DatasetConfig(path=path), hub_id, hub_config, split=read_split)
    out = []
    for row, record in enumerate(records):
        if limit is not None and len(out) == limit:
            break
        if not own_splits:
            key = record.get("id") or _text(record, "question", source, row)
            if _side(f"{name}|{key}") != split:
                continue
        out.append(reader(record, source, row, split))
    return out


def file_questions(gsm8k: str | None, hotpotqa: str | None, split: str, limit_each: int | None,
                   seed: int) -> list[Question]:
    """GSM8K and HotpotQA questions of ``split`` (local files or hub ids; None skips one), mixed and shuffled.

    ``limit_each`` keeps the first that many rows of each source's split, in file order. Every bad row is a
    DataError naming the file, the row (0-based, as in the ids) and the field.
    """
    _check_split(split)
    if gsm8k is None and hotpotqa is None:
        raise DataError("no AutoDSPy question files: give a GSM8K or a HotpotQA path (or hub id)")
    out = []
    for name, path in (("gsm8k", gsm8k), ("hotpotqa", hotpotqa)):
        if path is not None:
            out += _read(name, path, split, limit_each)
    random.Random(f"raylign-dspy-files|{seed}|{split}").shuffle(out)
    return out
