"""AutoDSPy's reward: the regex stage, and how it combines with an LLM judge. Pure functions, no model calls.

The seed (``compare_answers`` / ``compute_reward``, DSPy_GRPO.ipynb and DSPy_Reinforce.ipynb) reads the
pipeline output's last ``[...]`` (``re.findall(r'\\[(.*?)\\]')``, within one line), else its last number
(``-?\\d*\\.?\\d+``); it reads the ground truth the same way; it compares the first number of each as a
string, else the two strings; 1.0 or 0.0. Only if that is 0.0 does it ask the judge (``combine``).
Deviations in ``regex_score``, each because the seed's reading loses right answers:
- numbers are normalised (``answers.normalize_number``): "1,200" = "1200", "18.00" = "18", "$18" = "18";
  the seed compares raw digits, so "18.0" != "18" and "1,200" reads as 200;
- the number inside a bracket is its last one ("[5 + 3 = 8]" -> 8, "[18 dollars]" -> 18); the seed's first;
- the truth is not parsed: a truth that is a number is compared as a number, any other truth (HotpotQA) as
  text, by SQuAD exact match (``text_metric="em"``, the default, binary like the seed) or token F1
  (``"f1"``), against the last bracket or, without one, the whole output. The seed reads a number out of
  the truth too, so a HotpotQA answer without a digit never matches and always goes to the judge;
- DSPy ChatAdapter field markers (``[[ ## completed ## ]]``) are dropped before brackets are read;
- brackets are found by a linear scan: the seed's lazy regex is quadratic on a line of "[".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from raylign.envs.answers import extract_last_number, normalize_number, numbers_equal
from raylign.envs.rag.rewards import normalize_answer, token_f1

HOWS: tuple[str, ...] = ("bracket", "last_number", "text", "none")  # where the regex stage read the answer
_MARKER = re.compile(r"\[\[ ## [A-Za-z0-9_]+ ## \]\]")


def exact_match(prediction: str | None, truth: str) -> float:
    """1.0 if the two are equal after SQuAD normalisation (case, punctuation, articles, spaces), else 0.0."""
    return float(prediction is not None and normalize_answer(prediction) == normalize_answer(truth))


TEXT_METRICS: dict[str, Callable[[str | None, str], float]] = {"em": exact_match, "f1": token_f1}


def last_bracket(text: str | None) -> str | None:
    """Content (stripped) of the last ``[...]`` that opens and closes on one line, as the seed's
    ``re.findall(r'\\[(.*?)\\]', text)[-1].strip()``; None if there is none. DSPy field markers are skipped."""
    if not isinstance(text, str) or "[" not in text:
        return None
    last = None
    for line in _MARKER.sub(" ", text).split("\n"):
        pos = 0
        while (start := line.find("[", pos)) != -1 and (end := line.find("]", start + 1)) != -1:
            last, pos = line[start + 1: end], end + 1
    return None if last is None else last.strip()


def regex_score(output: str | None, truth: str, text_metric: str = "em") -> tuple[float, str]:
    """Stage one: ``(score in [0, 1], how)``, ``how`` one of ``HOWS``.

    A numeric truth: the last number of the last bracket (``how="bracket"``; a bracket without a number
    scores 0, as in the seed), else the last number of the output (``"last_number"``), compared exactly.
    A text truth: ``TEXT_METRICS[text_metric]`` of the last bracket (``"bracket"``) or the whole output
    (``"text"``). ``"none"``: no output (a failed pipeline), nothing to read, or an empty truth.
    """
    if text_metric not in TEXT_METRICS:
        raise ValueError(f"unknown text_metric {text_metric!r}; known: {', '.join(TEXT_METRICS)}")
    if not isinstance(output, str) or not isinstance(truth, str) or not truth.strip():
        return 0.0, "none"
    bracket = last_bracket(output)
    if normalize_number(truth) is not None:
        if bracket is not None:
            return float(numbers_equal(extract_last_number(bracket), truth)), "bracket"
        number = extract_last_number(output)
        return (float(numbers_equal(number, truth)), "last_number") if number is not None else (0.0, "none")
    if bracket is not None:
        return TEXT_METRICS[text_metric](bracket, truth), "bracket"
    if not output.strip():
        return 0.0, "none"
    return TEXT_METRICS[text_metric](output.strip(), truth), "text"


def needs_judge(regex_score: float, output: str | None) -> bool:
    """Whether stage two runs: the regex stage scored exactly 0 and the pipeline produced an output.

    As the seed: ``compute_reward`` returns 0.0 for a ``None`` response (a failed pipeline) without asking
    the judge, and asks it only when ``compare_answers`` is 0.0; an empty string is still judged. With
    ``text_metric="f1"`` a partial score (0 < F1 < 1) stands and the judge is not asked.
    """
    return output is not None and regex_score == 0.0


def combine(regex_score: float, judge_score: float | None) -> float:
    """The seed's two stages: the regex score if it is above 0, else the judge's score clipped to [0, 1].

    Seed: the judge's reply is read as its last ``[...]``, else its last number, ``float()``-ed and
    clipped; a ValueError/TypeError/IndexError scores 0.0 (a reply with neither a bracket nor a number
    raises an uncaught AttributeError there). Here ``judge_score`` is the already-read verdict: ``None`` (not
    asked, or unreadable: counted by the caller) and a non-finite number score 0.0 (the seed's clip turns
    inf into 1.0 and keeps nan). Other notebooks: PPO skips the regex stage and asks the judge for a bare
    number; REINFORCE also runs a fixed ``question -> reasoning -> answer`` pipeline and returns the judge
    of the generated output if its regex is 0, else the judge of the fixed output if that regex is 0 (so a
    right choice can score below 1), else 1.0; issue 12 asks for the max of the two combined rewards instead.
    """
    if regex_score > 0.0:
        return float(regex_score)
    if judge_score is None or not math.isfinite(judge_score):
        return 0.0
    return min(max(float(judge_score), 0.0), 1.0)
