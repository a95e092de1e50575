"""Hybrid fusion of dense and BM25 candidates, checked against numbers worked out by hand."""

from __future__ import annotations

import pytest

from raylign.config import RagConfig
from raylign.envs.rag.corpus import Chunk
from raylign.envs.rag.store import FUSIONS, Hit, best_per_document, minmax, rrf_fusion, weighted_fusion


def test_minmax():
    assert minmax({"a": 2.0, "b": 4.0, "c": 3.0}) == {"a": 0.0, "b": 1.0, "c": 0.5}
    assert minmax({"a": 0.7, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert minmax({}) == {}


def test_weighted_fusion_by_hand():
    dense = {"a": 0.9, "b": 0.7, "c": 0.5}  # minmax: a 1, b 0.5, c 0
    bm25 = {"b": 12.0, "d": 4.0, "c": 8.0}  # minmax: b 1, c 0.5, d 0
    fused = weighted_fusion(dense, bm25, dense_weight=0.3)
    # a: 0.3*1 + 0.7*0 = 0.3; b: 0.3*0.5 + 0.7*1 = 0.85; c: 0 + 0.7*0.5 = 0.35; d: 0 + 0 = 0
    assert fused == pytest.approx({"a": 0.3, "b": 0.85, "c": 0.35, "d": 0.0})
    assert weighted_fusion(dense, {}, 0.5) == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.0})


def test_rrf_by_hand():
    fused = rrf_fusion([["a", "b", "c"], ["b", "d"]], rrf_k=60)
    assert fused == pytest.approx({"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 63, "d": 1 / 62})
    # RRF ranks through the registry: dense {a > b > c}, bm25 {b > d}
    via_registry = FUSIONS["rrf"]({"a": 0.9, "b": 0.5, "c": 0.1}, {"b": 3.0, "d": 1.0}, RagConfig(rrf_k=1))
    assert via_registry == pytest.approx({"a": 1 / 2, "b": 1 / 3 + 1 / 2, "c": 1 / 4, "d": 1 / 3})


def test_best_chunk_per_document_and_top_k():
    chunks = {c.id: c for c in [Chunk("x#0", "x", "x zero"), Chunk("x#1", "x", "x one"), Chunk("y#0", "y", "y zero"),
                                Chunk("z#0", "z", "z zero")]}
    scores = {"x#0": 0.2, "x#1": 0.9, "y#0": 0.5, "z#0": 0.5}
    assert best_per_document(scores, chunks, k=5) == [Hit("x", "x#1", "x one", 0.9), Hit("y", "y#0", "y zero", 0.5),
                                                      Hit("z", "z#0", "z zero", 0.5)]
    assert [h.doc_id for h in best_per_document(scores, chunks, k=2)] == ["x", "y"]
