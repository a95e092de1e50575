"""Prompts for an LLM judge and reading its verdicts: pure functions, no model calls.

A judge model served elsewhere grades either one reasoning step in the context of the steps before it
(a process reward, as a step-level critic) or a whole response's final answer against a reference (an
outcome reward). It is asked to end with a line "Score: N", N from 0 to 10, and ``parse_verdict`` turns
that into N / scale in [0, 1]. This is single-answer grading in the sense of LLM-as-a-judge (Zheng et al.
2023, MT-Bench), whose "Rating: [[N]]" we replace by a plain "Score: N" line. Choices: the LAST score line
counts (a judge that reconsiders "Score: 3 ... Score: 8" means 8), a reply that is just a number counts,
and a score outside [0, scale] or a denominator other than the scale is unreadable (None), not clipped: a
judge answering off the scale has not followed the prompt and its number means nothing. Parsing never
raises and is linear in the reply, whatever the judge writes.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

from raylign.types import Score

JUDGE_SYSTEM = "You are a careful, strict grader. Follow the instructions and end with the score line."

STEP_TEMPLATE = """You are shown a problem, the previous steps of a solution, and the next step.

Problem:
{question}

Previous steps:
{previous_steps}

Next step:
{step}

Is the next step correct, and is it useful progress towards solving the problem given the previous steps?
Explain briefly, then end with a single line of the form "Score: N", where N is one number from 0 (wrong or
useless) to 10 (correct and useful)."""

ANSWER_TEMPLATE = """You are shown a problem, its reference answer, and a response.

Problem:
{question}

Reference answer:
{reference}

Response:
{response}

Does the final answer of the response match the reference answer? Judge only the final answer, not the
reasoning; equivalent forms of the same answer (such as 1/2 and 0.5) match. Explain briefly, then end with a
single line of the form "Score: N", where N is one number from 0 (does not match) to 10 (matches)."""

# "Score:" with optional markdown bold ("**Score:** 7", "**Score**: 7"); "\b" so "underscore:" is no score.
_SCORE = re.compile(r"\bscore\**\s*[:\uff1a]", re.IGNORECASE)
# A signed number and an optional "/ denominator"; deterministic after each character, so no backtracking.
_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))(?:\s*/\s*(\d+(?:\.\d+)?))?"
_AFTER_SCORE = re.compile(r"[\s*]*" + _NUMBER)
_BARE = re.compile(r"\s*" + _NUMBER + r"\s*")


def template_fields(template: str) -> list[str]:
    """The field names of a ``str.format`` template, in order of first use; ValueError on non-name fields."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():  # "{}", "{0}", "{q.attr}", "{q[0]}": only plain names are filled
            raise ValueError(f"judge template field {{{name}}} is not a plain name")
        if name not in names:
            names.append(name)
    return names


def judge_messages(template: str, **fields) -> list[dict[str, str]]:
    """Chat messages for the judge: the system line and the template filled with ``fields``.

    Every field of the template must be given (ValueError naming the first missing one); fields the
    template does not use are ignored, so one call site can serve several templates.
    """
    missing = [name for name in template_fields(template) if name not in fields]
    if missing:
        raise ValueError(f"judge template needs field {missing[0]!r} (missing: {', '.join(missing)})")
    content = template.format_map({name: str(value) for name, value in fields.items()})
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def _scaled(number: str, denominator: str | None, scale: float) -> float | None:
    value = float(number)  # a 5000-digit number is inf, not an error, and falls outside the scale below
    if denominator is not None and float(denominator) != scale:
        return None
    return value / scale if 0.0 <= value <= scale else None


def parse_verdict(text, scale: float = 10.0) -> float | None:
    """N / scale from the LAST "Score: N" (or N/scale) of a judge's reply, or from a reply that is just N.

    None for anything else: no score line, a last score line without a number, N outside [0, scale],
    a denominator other than ``scale``, a non-string. Never raises on the text; a non-positive scale is
    the caller's bug and raises ValueError.
    """
    if not scale > 0:
        raise ValueError(f"verdict scale must be positive, got {scale!r}")
    if not isinstance(text, str) or not text:
        return None
    try:
        last = None
        for last in _SCORE.finditer(text):
            pass
        if last is not None:
            m = _AFTER_SCORE.match(text, last.end())
        else:
            m = _BARE.fullmatch(text)
        return _scaled(m.group(1), m.group(2), scale) if m else None
    except (ValueError, OverflowError):
        return None


def step_judge_requests(question: str, steps: list[str], template: str = STEP_TEMPLATE) -> list[list[dict[str, str]]]:
    """One judge conversation per step: the question, the steps before it (newline-joined, "(none)" for the
    first) and the step itself."""
    return [judge_messages(template, question=question, previous_steps="\n".join(steps[:i]) or "(none)", step=step)
            for i, step in enumerate(steps)]


# ---- the judge as a reward stage (reward.judge) ---------------------------------------------------------

JudgeFn = Callable[[list[dict[str, str]]], str]  # one judge conversation -> the judge's reply


def judge_answer(judge: JudgeFn, question: str, reference: str, response: str,
                 template: str | None = None) -> tuple[float | None, str | None]:
    """Ask the judge whether ``response``'s final answer matches ``reference``: (verdict in [0, 1] or None
    when unreadable, the judge's reply). A judge call that raises counts as unreadable (reply None)."""
    messages = judge_messages(template or ANSWER_TEMPLATE, question=question, reference=reference, response=response)
    try:
        reply = judge(messages)
    except Exception:  # noqa: BLE001 - a failed judge call costs this sample's second stage, nothing more
        return None, None
    return parse_verdict(reply), reply


def judged_score(score: Score, judge: JudgeFn, question: str, reference: str, response: str,
                 template: str | None = None) -> Score:
    """Stage two for any env: a reply its own check marked wrong (and that said something) gets the judge's
    verdict as its reward. ``correct`` stays the env's check: accuracy is never the judge's word.
    Counted in ``info``: ``judge/called``, and ``judge/unreadable`` when the verdict cannot be read (reward 0)."""
    if score.correct or not response.strip():
        return score
    verdict, reply = judge_answer(judge, question, reference, response, template)
    info = {**score.info, "judge/called": 1, "judge/verdict": verdict, "judge/reply": reply,
            "judge/unreadable": int(verdict is None), "reward/before_judge": score.reward}
    reward = score.reward if verdict is None else max(score.reward, verdict)
    return Score(reward, score.correct, score.prediction, score.format_ok, info)
