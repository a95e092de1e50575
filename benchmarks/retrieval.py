"""Retrieval quality and retriever-actor throughput on MedQuAD (shared/data/medquad/qa.jsonl).

Corpus: a seeded sample of 2,000 QA rows (dataset.limit=2000, rag.split_seed=0); their distinct answer texts are
the documents (one per distinct answer, see raylign/envs/rag/corpus.py), chunked at rag defaults (800 chars,
100 overlap). Queries: a seeded sample of 500 of those 2,000 questions; the gold document is the question's
answer. Metrics per method (dense, bm25, hybrid = weighted fusion w=0.5; hybrid_rrf = RRF k=60): recall@1/5/10
(gold among the top k distinct documents) and MRR@10. Throughput: the 500 queries as one hybrid k=5 batch through
a RetrieverPool of 1 and of 2 actors (best of 3, after a warm-up). Each part runs in its own process.
Writes benchmarks/results/retrieval.json and retrieval.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import run_part  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QA_PATH = Path(__file__).resolve().parents[2] / "shared/data/medquad/qa.jsonl"
NUM_QA, NUM_QUERIES, KS = 2000, 500, (1, 5, 10)


def _cfg(**rag):
    from raylign.config import load_config

    overrides = [f"dataset.path={QA_PATH}", f"dataset.limit={NUM_QA}", f"rag.index_dir={os.environ['BENCH_INDEX_DIR']}"]
    return load_config(None, overrides + [f"rag.{k}={v}" for k, v in rag.items()], environ={})


def _queries(cfg):
    from raylign.envs.rag.store import qa_records

    records = qa_records(cfg, "all")
    return random.Random(1).sample(records, NUM_QUERIES)


def _scores(store, queries, method: str) -> dict:
    hits = store.search([q.question for q in queries], max(KS), method)
    ranks = [next((i + 1 for i, h in enumerate(hs) if h.doc_id == q.doc_id), None) for hs, q in zip(hits, queries)]
    out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / len(ranks) for k in KS}
    out["mrr"] = sum(1 / r for r in ranks if r) / len(ranks)
    return out


def part_quality() -> dict:
    from raylign.envs.rag.store import DocumentStore, build_store

    cfg = _cfg()
    start = time.perf_counter()
    store = build_store(cfg, progress=False)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    reopened = build_store(cfg, progress=False)
    reuse_s = time.perf_counter() - start
    queries, shared = _queries(cfg), _shared_answers(cfg)
    result = {m: _scores(store, queries, m) for m in ("dense", "bm25", "hybrid")}
    result["hybrid_rrf"] = _scores(DocumentStore(store.path, _cfg(fusion="rrf").rag), queries, "hybrid")
    start = time.perf_counter()
    store.search([q.question for q in queries], 5, "hybrid")
    result["in_process_queries_per_s"] = NUM_QUERIES / (time.perf_counter() - start)
    result.update(index_path=str(store.path), build_s=build_s, first_build_reused=store.reused,
                  reuse_open_s=reuse_s, second_build_reused=reopened.reused, build_s_meta=store.meta["build_s"],
                  documents=store.num_documents, chunks=store.num_chunks, queries=len(queries),
                  queries_with_shared_answer=len([q for q in queries if q.doc_id in shared]))
    return result


def _shared_answers(cfg) -> set[str]:
    from collections import Counter

    from raylign.envs.rag.store import qa_records

    counts = Counter(r.doc_id for r in qa_records(cfg, "all"))
    return {d for d, n in counts.items() if n > 1}


def _torch_threads(actor) -> int:
    import torch

    return torch.get_num_threads()


def part_throughput() -> dict:
    import ray

    from raylign.orchestrator.retriever_pool import RetrieverPool

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
    out, threads = {}, {}
    for n in (1, 2):
        cfg = _cfg(num_retrievers=n)
        queries = [q.question for q in _queries(cfg)]
        pool = RetrieverPool(cfg)
        threads[str(n)] = ray.get(pool.actors[0].__ray_call__.remote(_torch_threads))
        pool.search(queries[:32], 5)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            pool.search(queries, 5)
            times.append(time.perf_counter() - start)
        out[str(n)] = NUM_QUERIES / min(times)
        pool.shutdown()
    ray.shutdown()
    return {"queries_per_s": out, "actor_torch_threads": threads}


PARTS = {"quality": part_quality, "throughput": part_throughput}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, metrics = ["dense", "bm25", "hybrid", "hybrid_rrf"], ["recall@1", "recall@5", "recall@10", "mrr"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.2
    for i, m in enumerate(methods):
        ax1.bar([j + i * width for j in range(len(metrics))], [result[m][x] for x in metrics], width, label=m)
    ax1.set_xticks([j + 1.5 * width for j in range(len(metrics))], metrics)
    ax1.set_ylim(0, 1)
    ax1.set_title(f"MedQuAD: {result['queries']} queries, {result['documents']} documents")
    ax1.legend()
    qps = result["queries_per_s"]
    ax2.bar(list(qps), list(qps.values()), color="gray")
    ax2.set_xlabel("retriever actors")
    ax2.set_title("hybrid queries/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=sorted(PARTS))
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(PARTS[args.part]()))
        return
    index_dir = tempfile.mkdtemp(prefix="raylign-bench-index-")
    os.environ["BENCH_INDEX_DIR"] = index_dir
    try:
        quality = run_part(__file__, "quality")
        throughput = run_part(__file__, "throughput")
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)
    result = {"dataset": str(QA_PATH.name), "qa_sample": NUM_QA, **quality, **throughput, "cpu_count": os.cpu_count()}
    result.pop("index_path")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieval.json").write_text(json.dumps(result, indent=2))
    _plot(result, RESULTS / "retrieval.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
