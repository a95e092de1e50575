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
