"""Retrieval-augmented search agent: document store, tool calls, multi-turn episodes, rewards, env."""

from __future__ import annotations

# Agent side (tools, episodes, rewards, env): plain Python, no store import.
from raylign.envs.rag.env import RagEnv
from raylign.envs.rag.episode import LAST_TURN_NOTE, run_episodes
from raylign.envs.rag.rewards import COMBINERS, COMPONENTS, combine_batch, score_trajectory
from raylign.envs.rag.tools import Action, format_error, format_results, parse_action

__all__ = [
    "COMBINERS", "COMPONENTS", "LAST_TURN_NOTE", "Action", "RagEnv", "combine_batch", "format_error",
    "format_results", "parse_action", "run_episodes", "score_trajectory",
]

# Retrieval side (corpus, store): chromadb, bm25s and sentence-transformers load lazily, on first use.
from raylign.envs.rag.corpus import Document, QARecord, load_corpus, load_qa, synthetic_corpus  # noqa: E402
from raylign.envs.rag.store import DocumentStore, Hit, build_store, qa_records  # noqa: E402

__all__ += ["Document", "DocumentStore", "Hit", "QARecord", "build_store", "load_corpus", "load_qa", "qa_records",
            "synthetic_corpus"]
