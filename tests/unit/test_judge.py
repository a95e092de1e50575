"""Judge prompts are filled exactly and verdicts parsed from concrete judge replies (the judge is an LLM)."""

from __future__ import annotations

import time

import pytest

from raylign.envs.judge import (
    ANSWER_TEMPLATE,
    JUDGE_SYSTEM,
    STEP_TEMPLATE,
    judge_messages,
    parse_verdict,
    step_judge_requests,
    template_fields,
)


@pytest.mark.parametrize("text, expected", [
    ("Score: 7", 0.7),
    ("score: 10/10", 1.0),
    ("I think... Score: 3\nScore: 8", 0.8),       # the last score line counts
    ("SCORE: 0", 0.0),
    ("The step is right.\nScore: 7.5", 0.75),
    ("Score: 9 / 10.", 0.9),
    ("**Score:** 6", 0.6),
    ("**Score**: 4", 0.4),
    ("Score:\n5", 0.5),
    ("7", 0.7),                                   # a bare number as the whole reply
    ("  10\n", 1.0),
    ("3/10", 0.3),
    ("Score: 11", None),                          # off the scale: unreadable, not clipped
    ("Score: -1", None),
    ("Score: 10.5", None),
    ("Score: 7/5", None),                         # a denominator other than the scale
    ("Score: 8\nScore: unsure", None),            # the last score line has no number
    ("Score: " + "9" * 5000, None),
    ("great", None),
    ("The answer is 7", None),                    # a number inside prose is no verdict
    ("underscore: 5", None),
    ("", None),
    ("   ", None),
    (None, None),
    (7, None),
    (["Score: 7"], None),
    (b"Score: 7", None),
])
def test_parse_verdict(text, expected):
    got = parse_verdict(text)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_parse_verdict_other_scale():
    assert parse_verdict("Score: 3", scale=5) == pytest.approx(0.6)
    assert parse_verdict("Score: 3/5", scale=5) == pytest.approx(0.6)
    assert parse_verdict("Score: 3/10", scale=5) is None
    assert parse_verdict("Score: 7", scale=5) is None
    with pytest.raises(ValueError, match="scale"):
        parse_verdict("Score: 1", scale=0)


@pytest.mark.parametrize("junk", ["Score: " + " " * 100_000, "score" * 20_000, "Score:" * 20_000,
                                  "1" * 100_000, "Score: 1" + " " * 100_000 + "x"])
def test_parse_verdict_is_linear_on_junk(junk):
    start = time.perf_counter()
    parse_verdict(junk)
    assert time.perf_counter() - start < 0.5


def test_templates_have_their_fields_and_ask_for_the_score_line():
    assert template_fields(STEP_TEMPLATE) == ["question", "previous_steps", "step"]
    assert template_fields(ANSWER_TEMPLATE) == ["question", "reference", "response"]
    for template in (STEP_TEMPLATE, ANSWER_TEMPLATE):
        assert '"Score: N"' in template and "from 0" in template and "to 10" in template


def test_judge_messages_fill_the_template_verbatim():
    messages = judge_messages(ANSWER_TEMPLATE, question="What is {x}?", reference=r"\frac{1}{2}",
                              response="It is 0.5.", unused="ignored")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == JUDGE_SYSTEM
    user = messages[1]["content"]
    # braces inside a value are text, not fields
    assert "Problem:\nWhat is {x}?\n\nReference answer:\n\\frac{1}{2}\n\nResponse:\nIt is 0.5.\n\n" in user
    assert "{" not in ANSWER_TEMPLATE.replace("{question}", "").replace("{reference}", "").replace("{response}", "")


def test_judge_messages_names_the_missing_field():
    with pytest.raises(ValueError, match="'reference'"):
        judge_messages(ANSWER_TEMPLATE, question="q", response="r")
    with pytest.raises(ValueError, match="not a plain name"):
        judge_messages("Grade {0}", question="q")
    assert judge_messages("Grade {answer!r} {{literally}}", answer="x")[1]["content"] == "Grade 'x' {literally}"


def test_step_judge_requests_one_conversation_per_step_with_the_steps_before_it():
    requests = step_judge_requests("Compute 2 + 3 * 4.", ["3 * 4 = 12", "2 + 12 = 14", "Final: 14"],
                                   template="Q: {question}\nBefore:\n{previous_steps}\nStep: {step}")
    assert [r[1]["content"] for r in requests] == [
        "Q: Compute 2 + 3 * 4.\nBefore:\n(none)\nStep: 3 * 4 = 12",
        "Q: Compute 2 + 3 * 4.\nBefore:\n3 * 4 = 12\nStep: 2 + 12 = 14",
        "Q: Compute 2 + 3 * 4.\nBefore:\n3 * 4 = 12\n2 + 12 = 14\nStep: Final: 14",
    ]
    assert all(r[0] == {"role": "system", "content": JUDGE_SYSTEM} for r in requests)
    assert step_judge_requests("q", []) == []
    default = step_judge_requests("Compute 1 + 1.", ["1 + 1 = 2"])[0][1]["content"]
    assert "Problem:\nCompute 1 + 1.\n\nPrevious steps:\n(none)\n\nNext step:\n1 + 1 = 2\n\n" in default
