"""AutoDSPy env, pure parts: the action parser (every reason, every module alias), the prompt, the regex
reward stage against hand-computed values, and the two-stage combination."""

from __future__ import annotations

import math
import random
import time

import pytest

from raylign.envs.dspy.actions import (
    DEFAULT_MODULES,
    MODULES,
    PARSE_REASONS,
    SIGNATURES,
    Action,
    ParseFailure,
    action_prompt,
    module_name,
    parse_action,
    resolve_modules,
    signature_fields,
)
from raylign.envs.dspy.rewards import combine, exact_match, last_bracket, needs_judge, regex_score

# Copied by hand from the seed's "Define Action Space" cell (nafew-azim/AUTODSPy, DSPy_GRPO.ipynb).
SEED_SIGNATURES = [
    "question -> answer", "text -> summary", "question -> reasoning", "question -> hypothesis",
    "problem -> solution", "problem_description -> explanation", "context -> summary", "context -> briefing",
    "word_problem -> solution", "math_problem -> answer", "prompt -> response", "query -> response",
    "text -> response", "prompt -> generated_text", "query -> generated_text",
]


def test_action_space_is_the_seeds():
    assert list(SIGNATURES) == SEED_SIGNATURES and len(set(SIGNATURES)) == 15
    assert resolve_modules(DEFAULT_MODULES) == ("ChainOfThought", "Predict")
    assert resolve_modules(["CoT", "Predict"]) == ("ChainOfThought", "Predict")  # the seed's spelling
    assert MODULES["ReAct"] == "ReAct" and "ReAct" not in DEFAULT_MODULES
    assert [module_name(m) for m in ("ChainOfThought", "Predict", "ReAct")] == ["CoT", "Predict", "ReAct"]


@pytest.mark.parametrize("text, module", [
    ("CoT | question -> answer", "ChainOfThought"),
    ("cot | question -> answer", "ChainOfThought"),
    ("COT | question -> answer", "ChainOfThought"),
    ("ChainOfThought | question -> answer", "ChainOfThought"),
    ("chainofthought | question -> answer", "ChainOfThought"),
    ("Predict | question -> answer", "Predict"),
    ("PREDICT | question -> answer", "Predict"),
    ("predict | question -> answer", "Predict"),
])
def test_every_alias_of_the_default_modules(text, module):
    assert parse_action(text) == Action(module, "question -> answer", ("question",), ("answer",))


@pytest.mark.parametrize("text, signature, inputs, outputs", [
    ("Predict | problem -> solution", "problem -> solution", ("problem",), ("solution",)),
    ("CoT|word_problem->solution", "word_problem -> solution", ("word_problem",), ("solution",)),
    ("  CoT \t|\t math_problem   ->   answer  \n\n", "math_problem -> answer", ("math_problem",), ("answer",)),
    ("\nPredict | Problem_Description -> EXPLANATION", "problem_description -> explanation",
     ("problem_description",), ("explanation",)),
    ("CoT | query -> generated_text", "query -> generated_text", ("query",), ("generated_text",)),
    ("Predict | context -> briefing\r\n", "context -> briefing", ("context",), ("briefing",)),
])
def test_valid_actions_with_whitespace_and_case(text, signature, inputs, outputs):
    action = parse_action(text)
    assert isinstance(action, Action)
    assert (action.signature, action.inputs, action.outputs) == (signature, inputs, outputs)


@pytest.mark.parametrize("module", DEFAULT_MODULES)
@pytest.mark.parametrize("signature", SIGNATURES)
def test_canonical_text_round_trips(module, signature):
    action = parse_action(f"{module_name(module)} | {signature}")
    assert action.module == module and action.signature == signature
    assert parse_action(action.text) == action


def test_react_and_multi_input_signatures_when_configured():
    modules, signatures = ["Predict", "ReAct"], ["question, context -> answer", "question -> reasoning, answer"]
    assert parse_action("ReAct | question -> answer") == ParseFailure("unknown_module")  # not a default
    assert parse_action("react|question ,context->  answer", modules, signatures) == Action(
        "ReAct", "question, context -> answer", ("question", "context"), ("answer",))
    assert parse_action("Predict | question -> reasoning,answer", modules, signatures) == Action(
        "Predict", "question -> reasoning, answer", ("question",), ("reasoning", "answer"))
    assert parse_action("CoT | question, context -> answer", modules, signatures) == ParseFailure("unknown_module")
    assert parse_action("Predict | context, question -> answer", modules, signatures) == ParseFailure(
        "unknown_signature")  # field order is part of the signature


@pytest.mark.parametrize("text, reason", [
    (None, "empty"),
    ("", "empty"),
    ("  \n\t ", "empty"),
    (42, "malformed"),
    (["CoT", "question -> answer"], "malformed"),
    ('["CoT", "question -> answer"]', "malformed"),  # the seed's list spelling
    ("CoT", "malformed"),
    ("CoT question -> answer", "malformed"),
    ("CoT |", "malformed"),
    ("| question -> answer", "malformed"),
    ("Chain of Thought | question -> answer", "malformed"),
    ("`CoT` | question -> answer", "malformed"),
    ("Sure!\nCoT | question -> answer", "malformed"),
    ("CoT |\nquestion -> answer", "malformed"),
    ("CoT | question answer", "malformed"),
    ("CoT | -> answer", "malformed"),
    ("CoT | question ->", "malformed"),
    ("CoT | Predict | question -> answer", "malformed"),
    ("CoT | 1question -> answer", "malformed"),
    ("ReAct | question -> answer", "unknown_module"),
    ("PoT | question -> answer", "unknown_module"),
    ("Retrieve | question -> answer", "unknown_module"),
    ("CoT | question -> summary", "unknown_signature"),
    ("CoT | question, context -> answer", "unknown_signature"),
    ("Predict | answer -> question", "unknown_signature"),
    ("CoT | question -> answer_text", "unknown_signature"),
    ("CoT | question -> answer.", "trailing_text"),
    ("CoT | question -> answer | stop", "trailing_text"),
    ("CoT | question -> answer because it is a math problem", "trailing_text"),
    ("CoT | question -> answer\nThis pipeline reasons first.", "trailing_text"),
    ("CoT | question -> answer -> summary", "trailing_text"),
    ("CoT | question -> answer,", "trailing_text"),
])
def test_every_parse_failure_reason(text, reason):
    assert parse_action(text) == ParseFailure(reason)


def test_parse_failure_reasons_are_a_closed_set():
    with pytest.raises(ValueError):
        ParseFailure("other")
    assert set(PARSE_REASONS) == {"empty", "malformed", "unknown_module", "unknown_signature", "trailing_text"}


def test_bad_config_raises_not_the_text():
    with pytest.raises(ValueError, match="unknown DSPy modules"):
        parse_action("CoT | question -> answer", modules=["CoT", "Retrieve"])
    with pytest.raises(ValueError, match="not of the form"):
        parse_action("CoT | question -> answer", signatures=["question answer"])
    with pytest.raises(ValueError, match="are the same"):
        parse_action("CoT | question -> answer", signatures=["question -> answer", "Question->Answer"])
    with pytest.raises(ValueError, match="repeats"):
        signature_fields("question -> question")
    assert signature_fields(" a , b->c ") == (("a", "b"), ("c",))


def _junk(rng: random.Random) -> str:
    """Either random pieces and code points, or a valid action with a few random edits."""
    pieces = ["CoT", "Predict", "ReAct", "cot", "|", "->", "-", ">", ",", " ", "\t", "\n", "question", "answer",
              "context", "[", "]", "stop", "_", "1", "\u00e9", "\u200b", "\u212a", "\x00", "\ud83d\ude00"]
    if rng.random() < 0.5:
        return "".join(rng.choice(pieces) if rng.random() < 0.8 else chr(rng.randrange(0xD800))
                       for _ in range(rng.randrange(12)))
    text = list(f"{rng.choice(['CoT', 'Predict', 'ReAct'])} | {rng.choice(SIGNATURES)}")
    for _ in range(rng.randrange(3)):
        i = rng.randrange(len(text) + 1)
        text[i:i + rng.randrange(2)] = list(rng.choice(pieces + ["", "."]))
    return "".join(text)


def test_parse_action_never_raises_on_junk():
    rng = random.Random(12)
    seen = set()
    for _ in range(600):
        result = parse_action(_junk(rng))
        assert isinstance(result, (Action, ParseFailure))
        if isinstance(result, Action):
            assert result.signature in SIGNATURES and result.module in DEFAULT_MODULES
            assert parse_action(result.text) == result
        seen.add("action" if isinstance(result, Action) else result.reason)
    assert seen == {"action", *PARSE_REASONS}  # the junk reaches every branch


def test_parse_action_is_linear_on_long_input():
    start = time.perf_counter()
    for text in ("CoT | " + "a , " * 50_000 + "-> answer", "CoT | question" + " " * 100_000 + "x",
                 "CoT | question -> answer" + "!" * 100_000, "|" * 100_000, "[" * 100_000):
        assert isinstance(parse_action(text), ParseFailure)
    assert time.perf_counter() - start < 2.0


def test_action_prompt_lists_the_choices_and_the_format():
    system, user = action_prompt("What is 5 + 3?")
    assert system["role"] == "system" and user == {"role": "user", "content": "Question:\nWhat is 5 + 3?"}
    lines = system["content"].splitlines()
    assert all(f"- {s}" in lines for s in SIGNATURES)
    assert "- CoT: reasons step by step, then answers" in lines and "- Predict: answers directly" in lines
    assert "ReAct" not in system["content"]
    assert isinstance(parse_action(lines[-1]), Action)  # the example line parses
    assert "<module> | <signature>" in lines
    react = action_prompt("q", ["Predict", "ReAct"], ["question -> answer"])[0]["content"]
    assert "- ReAct: reasons and calls tools in a loop, then answers" in react.splitlines()
    assert react.splitlines()[-1] == "Predict | question -> answer"


# ---- reward: regex stage


@pytest.mark.parametrize("output, truth, expected", [
    ("The answer is [18].", "18", (1.0, "bracket")),
    ("[1,200 dollars]", "1200", (1.0, "bracket")),
    ("So she pays [$1,234.50] in total", "1234.5", (1.0, "bracket")),
    ("[18.00]", "18", (1.0, "bracket")),
    ("[18 eggs]", "18", (1.0, "bracket")),
    ("[5 + 3 = 8]", "8", (1.0, "bracket")),  # the bracket's last number (the seed reads its first, 5)
    ("[-7]", "-7", (1.0, "bracket")),
    ("[17]", "18", (0.0, "bracket")),
    ("[eighteen] so 18", "18", (0.0, "bracket")),  # a bracket is the answer, as in the seed
    ("first [3], finally [5]", "5", (1.0, "bracket")),
    ("[42]\n[[ ## completed ## ]]", "42", (1.0, "bracket")),  # DSPy's field marker is not an answer
    ("She has 18 eggs left.", "18", (1.0, "last_number")),
    ("Total: $1,200.00", "1200", (1.0, "last_number")),
    ("10 - 3 = 7 km", "7", (1.0, "last_number")),
    ("3 apples and 4 pears", "3", (0.0, "last_number")),
    ("[18\n]", "18", (1.0, "last_number")),  # a bracket closes on its own line, as the seed's regex
    ("no number here", "18", (0.0, "none")),
    ("", "18", (0.0, "none")),
    (None, "18", (0.0, "none")),
    ("[18]", "", (0.0, "none")),
])
def test_regex_stage_numbers(output, truth, expected):
    assert regex_score(output, truth) == expected


@pytest.mark.parametrize("output, truth, text_metric, expected", [
    ("[Arthur's Magazine]", "Arthur's Magazine", "em", (1.0, "bracket")),
    ("the arthurs magazine", "Arthur's Magazine", "em", (1.0, "text")),
    ("Delhi [Delhi Sultanate]", "Delhi Sultanate", "em", (1.0, "bracket")),
    ("[yes]", "no", "em", (0.0, "bracket")),
    # pred tokens: magazine that was started first is arthurs magazine (8); gold: arthurs magazine (2);
    # overlap 2 -> P = 1/4, R = 1, F1 = 2 * (1/4) / (5/4) = 0.4.
    ("The magazine that was started first is Arthur's Magazine.", "Arthur's Magazine", "em", (0.0, "text")),
    ("The magazine that was started first is Arthur's Magazine.", "Arthur's Magazine", "f1", (0.4, "text")),
    # [Paris France] vs Paris: P = 1/2, R = 1 -> F1 = 2/3.
    ("[Paris, France]", "Paris", "f1", (2 / 3, "bracket")),
    ("[Paris]", "Paris", "f1", (1.0, "bracket")),
    ("[]", "Paris", "f1", (0.0, "bracket")),
    ("  \n", "Paris", "em", (0.0, "none")),
    ("He was born in 1923.", "1923", "em", (1.0, "last_number")),  # a numeric HotpotQA answer
])
def test_regex_stage_text(output, truth, text_metric, expected):
    score, how = regex_score(output, truth, text_metric=text_metric)
    assert how == expected[1] and score == pytest.approx(expected[0])


def test_exact_match_and_unknown_metric():
    assert exact_match("The Beatles!", "beatles") == 1.0
    assert exact_match("Beatles band", "beatles") == 0.0
    assert exact_match(None, "beatles") == 0.0
    with pytest.raises(ValueError, match="text_metric"):
        regex_score("[1]", "1", text_metric="bleu")


def test_last_bracket_is_the_seeds_findall_and_linear():
    assert last_bracket("a [1] b [ 2 ] c") == "2"
    assert last_bracket("[[a]") == "[a"  # as re.findall(r'\[(.*?)\]') reads it
    assert last_bracket("[a] b]") == "a"
    assert last_bracket("[a\n]") is None and last_bracket(None) is None
    start = time.perf_counter()
    assert last_bracket("[" * 200_000) is None
    assert regex_score("[" * 100_000 + "7", "7") == (1.0, "last_number")
    assert time.perf_counter() - start < 2.0


# ---- reward: combining the stages


@pytest.mark.parametrize("regex, judge, expected", [
    (1.0, None, 1.0),
    (1.0, 0.2, 1.0),  # the judge never overrides a regex match
    (0.4, 0.9, 0.4),  # a partial F1 stands: the seed asks the judge only on 0
    (0.0, None, 0.0),  # not asked, or its verdict was unreadable
    (0.0, 0.7, 0.7),
    (0.0, 1.5, 1.0),
    (0.0, -0.2, 0.0),
    (0.0, math.nan, 0.0),
    (0.0, math.inf, 0.0),
])
def test_combine(regex, judge, expected):
    assert combine(regex, judge) == expected


def test_needs_judge_only_when_the_regex_stage_fails_on_an_output():
    assert needs_judge(0.0, "I think it is nine") is True
    assert needs_judge(0.0, "") is True  # the seed judges an empty output too
    assert needs_judge(0.0, None) is False  # a failed pipeline scores 0 unjudged
    assert needs_judge(1.0, "[9]") is False
    assert needs_judge(0.4, "Paris, France") is False
