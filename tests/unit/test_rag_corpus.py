"""Corpus pieces of the RAG env: chunk windows, the synthetic corpus, MedQuAD-shaped QA and load errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raylign.config import load_config
from raylign.envs.data import DataError
from raylign.envs.rag.corpus import (Document, QARecord, answer_doc_id, answers_as_gold, chunk_documents, chunk_spans,
                                     corpus_from_qa, load_corpus, load_qa, synthetic_corpus)
from raylign.envs.rag.store import qa_records, split_records


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chunks_without_whitespace_are_exact_windows():
    text = "abcdefghijklmnopqrstuvwxy"  # 25 chars, no whitespace: plain windows of 10 every 7
    assert chunk_spans(text, 10, 3) == [(0, 10), (7, 17), (14, 24), (21, 25)]
    chunks = chunk_documents([Document("d", text)], 10, 3)
    assert [c.id for c in chunks] == ["d#0", "d#1", "d#2", "d#3"]
    assert [c.text for c in chunks] == ["abcdefghij", "hijklmnopq", "opqrstuvwx", "vwxy"]
    assert {c.doc_id for c in chunks} == {"d"}


def test_chunks_break_at_whitespace_and_overlap_whole_words():
    text = "alpha beta gamma delta epsilon zeta eta theta"
    chunks = chunk_documents([Document("x", text)], 16, 5)
    assert [c.text for c in chunks] == ["alpha beta gamma", "gamma delta", "delta epsilon", "epsilon zeta eta",
                                        "zeta eta theta"]
    assert all(len(c.text) <= 16 for c in chunks)
    spans = chunk_spans(text, 16, 5)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):  # >= 5 shared characters, starting at a word
        assert e0 - s1 >= 5 and text[s1 - 1] == " "
    # the windows cover the text: dropping each chunk's overlap with its predecessor rebuilds it
    assert "".join(text[max(s, spans[i - 1][1] if i else 0):e] for i, (s, e) in enumerate(spans)) == text


def test_zero_overlap_cuts_at_spaces_without_repeating_words():
    text = "one two three four five six"
    assert [text[s:e] for s, e in chunk_spans(text, 9, 0)] == ["one two", " three", " four", " five six"]


def test_chunk_overlap_must_be_below_size():
    with pytest.raises(ValueError, match="overlap 10"):
        chunk_spans("some text", 10, 10)
    assert chunk_documents([Document("e", "")], 10, 2) == []


def test_synthetic_corpus_is_deterministic_and_answers_lie_in_the_gold_document():
    docs, qa = synthetic_corpus(200, seed=3)
    assert (docs, qa) == synthetic_corpus(200, seed=3)
    assert synthetic_corpus(200, seed=4)[0][0].text != docs[0].text
    assert len(docs) == len(qa) == 200 and len({d.id for d in docs}) == 200
    by_id = {d.id: d for d in docs}
    assert all(q.answer in by_id[q.doc_id].text for q in qa)
    # the subject of each document is unique, and the full name appears first in its own document
    names = [d.metadata["name"] for d in docs]
    assert len(set(names)) == 200 and len({d.metadata["founder"] for d in docs}) == 200
    assert all(d.text.startswith(f"The {d.metadata['name']} was founded in {d.metadata['year']}") for d in docs)
    # questions ask one attribute and do not copy the document
    assert all(len(q.question) < len(by_id[q.doc_id].text) / 3 for q in qa)
    assert len({" ".join(q.question.split(" ")[:2]) for q in qa}) >= 5


def test_synthetic_corpus_has_distractors():
    docs, qa = synthetic_corpus(200, seed=3)
    towns = [d.metadata["town"] for d in docs]
    assert len(set(towns)) <= 30  # 200 entities share 30 towns
    bases = [d.metadata["name"].split(" ")[0] for d in docs]
    assert len(set(bases)) < 190  # some base names come back with another kind
    # most subjects are also named in another document (rivals, portraits)
    texts = [d.text for d in docs]
    shared = sum(sum(d.metadata["name"] in t for t in texts) > 1 for d in docs)
    assert shared > 100


def test_load_corpus_reads_rows_and_names_bad_row_and_field(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "alpha", "metadata": {"k": 1}}, {"id": 7, "text": "b"}])
    assert load_corpus(path) == [Document("a", "alpha", {"k": 1}), Document("7", "b", {})]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "x"}] + [{"id": "b", "body": "y"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: missing field 'text' \(fields: body, id\)"):
        load_corpus(bad)
    empty = _jsonl(tmp_path / "empty.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "x"},
                                              {"id": "c", "text": " "}])
    with pytest.raises(DataError, match=r"empty\.jsonl: row 2: empty field 'text'"):
        load_corpus(empty)
    dup = _jsonl(tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(DataError, match=r"dup\.jsonl: row 1: field 'id' 'a' repeats row 0"):
        load_corpus(dup)
    meta = _jsonl(tmp_path / "meta.jsonl", [{"id": "a", "text": "x", "metadata": "oops"}])
    with pytest.raises(DataError, match=r"row 0: field 'metadata' must be a mapping"):
        load_corpus(meta)
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found \(rag\.corpus_path\)"):
        load_corpus(str(tmp_path / "nope.jsonl"))


def test_load_qa_names_row_and_field_and_samples_with_limit(tmp_path):
    rows = [{"qid": f"q{i}", "question": f"what {i}?", "answer": f"a{i}", "doc_id": f"d{i}"} for i in range(10)]
    path = _jsonl(tmp_path / "qa.jsonl", rows)
    qa = load_qa(path)
    assert qa[3] == QARecord("q3/3", "what 3?", "a3", "d3")
    sample = load_qa(path, limit=4, seed=1)
    assert len(sample) == 4 and sample == load_qa(path, limit=4, seed=1) and sample != qa[:4]
    assert [int(r.id.split("/")[1]) for r in sample] == sorted(int(r.id.split("/")[1]) for r in sample)
    bad = _jsonl(tmp_path / "badqa.jsonl", rows[:5] + [{"qid": "x", "question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"badqa\.jsonl: row 5: missing field 'doc_id' \(fields: answer, qid, question"):
        load_qa(bad)


def test_medquad_shape_one_document_per_distinct_answer():
    # MedQuAD reuses doc_ids across pages and repeats boiler-plate answers (see corpus.py docstring)
    qa = [QARecord("1/0", "What is A?", "A is  a\n   thing.", "0001-1"),
          QARecord("1/1", "What is B?", "B is a thing.", "0001-1"),
          QARecord("2/2", "Is A inherited?", "Autosomal recessive.", "0001-2"),
          QARecord("2/3", "Is B inherited?", "Autosomal recessive.", "0007-2")]
    docs = corpus_from_qa(qa)
    assert [d.text for d in docs] == ["A is a thing.", "B is a thing.", "Autosomal recessive."]
    assert docs[2].metadata == {"source_doc_ids": "0001-2,0007-2"}
    gold = answers_as_gold(qa)
    assert [g.doc_id for g in gold] == [docs[0].id, docs[1].id, docs[2].id, docs[2].id]
    assert docs[0].id == answer_doc_id("A is  a\n   thing.") and re.fullmatch(r"ans-[0-9a-f]{12}", docs[0].id)


def test_splits_are_disjoint_seeded_and_cover_all():
    records = [QARecord(f"r{i}", "q", "a", "d") for i in range(50)]
    train, test = (split_records(records, s, 0.2, seed=5) for s in ("train", "test"))
    assert len(test) == 10 and len(train) == 40
    assert {r.id for r in train} | {r.id for r in test} == {r.id for r in records}
    assert not {r.id for r in train} & {r.id for r in test}
    assert split_records(records, "test", 0.2, seed=5) == test != split_records(records, "test", 0.2, seed=6)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        split_records(records, "dev", 0.2, 0)


def test_qa_records_follow_the_config(tmp_path):
    cfg = load_config(None, ["rag.synthetic_num_facts=40"], environ={})
    test = qa_records(cfg, "test")
    assert len(test) == 8 and all(r.doc_id.startswith("syn-") for r in test)
    rows = [{"qid": f"q{i}", "question": f"q{i}?", "answer": f"a{i % 5}", "doc_id": "0001"} for i in range(20)]
    path = _jsonl(tmp_path / "qa.jsonl", rows)
    cfg = load_config(None, [f"dataset.path={path}", "dataset.limit=10"], environ={})
    train, test = qa_records(cfg, "train"), qa_records(cfg, "test")
    assert len(train) == 8 and len(test) == 2
    assert all(r.doc_id == answer_doc_id(r.answer) for r in train + test)
    cfg = load_config(None, [f"rag.corpus_path={path}"], environ={})
    with pytest.raises(DataError, match="set dataset.path"):
        qa_records(cfg, "train")
