"""SFT examples and preference pairs: file formats, structure errors, content validation, step scores, arith data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raylign.chat import encode_chat
from raylign.config import DatasetConfig, EnvConfig, ModelConfig
from raylign.envs.arith import ArithEnv
from raylign.envs.data import DataError
from raylign.envs.pairs import (
    RowIssue,
    arith_examples,
    arith_pairs,
    encode_response,
    load_examples,
    load_pairs,
    pairs_to_rows,
    response_char_ends,
    step_spans,
    token_scores,
    validate_examples,
    validate_pairs,
    write_jsonl,
)
from raylign.models import load_tokenizer, resolve_model
from raylign.types import Example, Pair

SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2 + 2?"}


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    # tiny-random-llama carries SmolLM2's tokenizer and chat template and is cheap to build.
    return load_tokenizer(resolve_model(ModelConfig(name="tiny-random-llama")))


# ---- loading -------------------------------------------------------------------------------------------

def test_examples_prompt_completion_and_response_strings(tmp_path):
    rows = [{"prompt": "q0", "completion": "a0"}, {"prompt": "q1", "response": "a1", "system": "Be brief."},
            {"prompt": "q2", "completion": "a2", "extra": 7}]
    path = _jsonl(tmp_path / "sft.jsonl", rows)
    got = load_examples(path, limit=2)
    assert got == [Example("sft-train-0", [_user("q0")], "a0", f"{path}:0"),
                   Example("sft-train-1", [SYS, _user("q1")], "a1", f"{path}:1")]


def test_examples_conversational_and_messages_formats(tmp_path):
    json_path = tmp_path / "conv.json"
    json_path.write_text(json.dumps([{"prompt": [SYS, USER], "completion": [_bot("4")]}]))
    assert load_examples(str(json_path), split="test") == [
        Example("conv-test-0", [SYS, USER], "4", f"{json_path}:0")]

    import datasets

    parquet = str(tmp_path / "train.parquet")
    conversation = [SYS, USER, _bot("4"), _user("and 3 + 3?"), _bot("6")]
    datasets.Dataset.from_list([{"messages": conversation}]).to_parquet(parquet)
    (ex,) = load_examples(str(tmp_path / "{split}.parquet"), split="train")
    assert (ex.id, ex.prompt, ex.response, ex.source) == ("train-train-0", conversation[:-1], "6", f"{parquet}:0")


def test_pairs_explicit_string_and_conversational_with_scores(tmp_path):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad", "scores_chosen": [1, 1.0],
             "scores_rejected": [0.5, 0]},
            {"prompt": [SYS, USER], "chosen": [_bot("4")], "rejected": [_bot("5")]}]
    path = _jsonl(tmp_path / "prefs.jsonl", rows)
    assert load_pairs(path) == [
        Pair("prefs-train-0", [_user("q")], "good", "bad", (1.0, 1.0), (0.5, 0.0), f"{path}:0"),
        Pair("prefs-train-1", [SYS, USER], "4", "5", None, None, f"{path}:1")]


def test_pairs_implicit_prompt_is_the_shared_prefix(tmp_path):
    shared = [USER, _bot("4"), _user("and 3 + 3?")]
    path = _jsonl(tmp_path / "implicit.jsonl", [{"chosen": shared + [_bot("6")], "rejected": shared + [_bot("7")],
                                                 "system": "Be brief."}])
    (pair,) = load_pairs(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([SYS, *shared], "6", "7")


def test_write_jsonl_and_trl_rows_round_trip(tmp_path):
    pairs = arith_pairs(EnvConfig(difficulty=3), DatasetConfig(), "train", 4, seed=0)
    back = load_pairs(write_jsonl(pairs, tmp_path / "out" / "pairs.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected, p.scores_chosen, p.scores_rejected) for p in back] == \
           [(p.prompt, p.chosen, p.rejected, p.scores_chosen, p.scores_rejected) for p in pairs]
    rows = pairs_to_rows(pairs)
    assert rows[0] == {"prompt": pairs[0].prompt, "chosen": [_bot(pairs[0].chosen)],
                       "rejected": [_bot(pairs[0].rejected)]}
    trl = load_pairs(write_jsonl(rows, tmp_path / "trl.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected) for p in trl] == [(p.prompt, p.chosen, p.rejected) for p in pairs]


# ---- structure errors ----------------------------------------------------------------------------------

GOOD_EXAMPLE = {"prompt": "q", "completion": "a"}
BAD_EXAMPLES = [
    ({"prompt": "q"}, r"completion: missing \(fields: prompt\)"),
    ({"completion": "a"}, r"prompt: missing \(fields: completion\)"),
    ({"prompt": 3, "completion": "a"}, r"prompt: expected a list of messages, got int"),
    ({"prompt": [USER, "hi"], "completion": "a"}, r"prompt\[1\]: expected a message"),
    ({"prompt": [{"role": "user"}], "completion": "a"}, r"prompt\[0\]\.content: missing"),
    ({"prompt": [USER], "completion": [_bot("a"), _bot("b")]}, r"completion: expected one assistant message"),
    ({"prompt": "q", "completion": "a", "response": "b"}, r"response: given together with completion"),
    ({"messages": [USER, _user("again")]}, r"messages: the last message must be the assistant's"),
    ({"prompt": [SYS, USER], "completion": "a", "system": "x"}, r"system: given twice"),
    ({"prompt": "q", "completion": "a", "system": ["x"]}, r"system: expected a string, got list"),
]


@pytest.mark.parametrize("row, message", BAD_EXAMPLES)
def test_malformed_example_rows_name_file_row_and_field(tmp_path, row, message):
    # Each bad row is alone in its own file's row 1, after a good row 0.
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD_EXAMPLE) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:1: {message}"):
        load_examples(str(path))


GOOD_PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}
BAD_PAIRS = [
    ({"prompt": "q", "chosen": "a"}, r"rejected: missing \(fields: chosen, prompt\)"),
    ({"chosen": "a", "rejected": "b"}, r"prompt: missing; without a prompt, chosen and rejected must be"),
    ({"chosen": [USER, _bot("a")], "rejected": [_user("other"), _bot("b")]},
     r"rejected: differs from chosen at message 0"),
    ({"chosen": [USER, _bot("a")], "rejected": [USER]}, r"rejected: the last message must be the assistant's"),
    ({"prompt": "q", "chosen": [_user("a")], "rejected": "b"}, r"chosen: expected one assistant message"),
    ({**GOOD_PAIR, "scores_chosen": "1"}, r"scores_chosen: expected a list of numbers, got str"),
    ({**GOOD_PAIR, "scores_rejected": [1, True]}, r"scores_rejected\[1\]: expected a number, got bool"),
]


@pytest.mark.parametrize("row, message", BAD_PAIRS)
def test_malformed_pair_rows_name_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD_PAIR) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:1: {message}"):
        load_pairs(str(path))


@pytest.mark.parametrize("name, text", [("rows.jsonl", '{"prompt": "q", "completion": "a"}\n[1, 2]\n'),
                                        ("rows.json", '[{"prompt": "q", "completion": "a"}, "text"]')])
def test_a_row_that_is_not_an_object_is_named(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}:1: row: expected an object, got (list|str)"):
        load_examples(str(tmp_path / name))


def test_missing_file_keeps_data_py_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_pairs(str(tmp_path / "nope.jsonl"))


# ---- validation ----------------------------------------------------------------------------------------

def _pair(chosen="2 + 2 = 4\nFinal: 4", rejected="2 + 2 = 5\nFinal: 5", prompt=(USER,), **scores) -> Pair:
    return Pair("p", list(prompt), chosen, rejected, source="f.jsonl:3", **scores)


def test_good_pairs_and_examples_have_no_issues(tok):
    good = [_pair(), _pair(scores_chosen=(1.0, 1.0), scores_rejected=(0.0, 0.0))]
    assert validate_pairs(good) == [] and validate_pairs(good, tok, max_len=200) == []
    examples = [Example("e", [SYS, USER], "4", "f.jsonl:0")]
    assert validate_examples(examples) == [] and validate_examples(examples, tok, max_len=200) == []


@pytest.mark.parametrize("pair, field, reason", [
    (_pair(prompt=(_user("  "),)), "prompt", "empty"),
    (_pair(prompt=()), "prompt", "empty"),
    (_pair(chosen=" \n"), "chosen", "empty"),
    (_pair(rejected=""), "rejected", "empty"),
    (_pair(rejected="2 + 2 = 4\nFinal: 4"), "rejected", "identical to chosen"),
    (_pair(scores_chosen=(1.0, 1.0)), "scores_rejected", "missing while scores_chosen is given (give both or neither)"),
    (_pair(scores_chosen=(1.0,), scores_rejected=(0.0, 0.0)), "scores_chosen",
     "1 scores match neither the response's 2 steps"),
    (_pair(scores_chosen=(1.0, math.nan), scores_rejected=(0.0, 0.0)), "scores_chosen",
     "1 score(s) not finite or outside [0, 1], first nan"),
    (_pair(scores_chosen=(1.0, 1.0), scores_rejected=(-0.5, 2.0)), "scores_rejected",
     "2 score(s) not finite or outside [0, 1], first -0.5"),
])
def test_each_pair_issue_is_reported(pair, field, reason):
    assert validate_pairs([pair, _pair()]) == [RowIssue("f.jsonl:3", field, reason)]
    assert str(validate_pairs([pair])[0]) == f"f.jsonl:3: {field}: {reason}"


def test_scores_per_token_need_the_tokenizer_and_long_pairs_are_flagged(tok):
    rejected = "2 + 2 = 5\nFinal: 5"
    n = len(encode_response(tok, rejected))
    pair = _pair(scores_chosen=(1.0, 1.0), scores_rejected=(0.0,) * n)
    assert validate_pairs([pair], tok) == []
    assert validate_pairs([pair]) == [RowIssue("f.jsonl:3", "scores_rejected",
                                               f"{n} scores match neither the response's 2 steps")]
    bad = _pair(scores_chosen=(1.0, 1.0), scores_rejected=(0.0,) * (n + 1))
    reason = f"{n + 1} scores match neither the response's 2 steps nor its {n} tokens"
    assert validate_pairs([bad], tok)[0].reason == reason

    long_pair = _pair(rejected="no " * 50)
    total = len(encode_chat(tok, [USER])) + len(encode_response(tok, "no " * 50))
    assert validate_pairs([long_pair], tok, max_len=total) == []
    assert validate_pairs([long_pair], tok, max_len=total - 1) == [
        RowIssue("f.jsonl:3", "rejected", f"prompt + response is {total} tokens, over max_len {total - 1}")]


def test_example_issues(tok):
    empty = [Example("a", [_user(" ")], "4", "f:0"), Example("b", [USER], "\n", "f:1")]
    assert [str(i) for i in validate_examples(empty)] == ["f:0: prompt: empty", "f:1: response: empty"]
    long = Example("c", [USER], "word " * 40, "f:2")
    total = len(encode_chat(tok, [USER])) + len(encode_response(tok, long.response))
    assert validate_examples([long], tok, max_len=total) == []
    assert validate_examples([long], tok, max_len=total - 1) == [
        RowIssue("f:2", "response", f"prompt + response is {total} tokens, over max_len {total - 1}")]


# ---- tokens and steps ----------------------------------------------------------------------------------

def test_step_spans_tile_the_response():
    text = "\n3 + 4 = 7\n\n  \n7 * 2 = 14\nFinal: 14"
    assert [text[a:b] for a, b in step_spans(text)] == ["\n3 + 4 = 7\n\n  \n", "7 * 2 = 14\n", "Final: 14"]
    assert step_spans(text) == [(0, 15), (15, 26), (26, 35)]
    assert step_spans("a. b. c", delimiter=". ") == [(0, 3), (3, 6), (6, 7)]
    assert step_spans("") == [] and step_spans(" \n\n") == []


def test_step_spans_blank_lines_join_the_previous_step():
    text = "a\n\n\nb\n"
    assert step_spans(text) == [(0, 4), (4, 6)]  # "a\n\n\n" and "b\n"


def test_token_scores_from_hand_made_spans_and_offsets():
    spans = [(0, 4), (4, 10), (10, 12)]
    # Tokens ending at 2, 4 (last char 3: step 0), 5, 10 (last char 9: step 1), 11, 12, and an EOS at 12.
    ends = [2, 4, 5, 10, 11, 12, 12]
    assert token_scores([1.0, 0.5, 0.0], 7, ends, spans) == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]
    assert token_scores([0.1] * 7, 7, ends, spans) == [0.1] * 7  # already one per token
    assert token_scores([0.3, 0.9], 2, [0, 20], [(0, 3), (3, 6)]) == [0.3, 0.9]  # both counts 2: per token wins
    assert token_scores([0.3, 0.9], 3, [0, 5, 20], spans[:2]) == [0.3, 0.9, 0.9]  # clamped to the first and last step
    with pytest.raises(ValueError, match="3 scores, but 2 steps and 4 tokens"):
        token_scores([1.0, 1.0, 1.0], 4, [1, 2, 3, 4], spans[:2])
    with pytest.raises(ValueError, match="3 token end offsets for 4 tokens"):
        token_scores([1.0], 4, [1, 2, 3], spans[:1])


def test_encode_response_ends_with_eos_and_char_ends_align(tok):
    text = "30 * 7 = 210\n4 * 7 = 28\n\n210 + 28 = 238\nFinal: 238"
    ids = encode_response(tok, text)
    assert ids[-1] == tok.eos_token_id and tok.eos_token == "<|im_end|>"
    assert ids[:-1] == tok(text, add_special_tokens=False)["input_ids"]
    ends = response_char_ends(tok, text)
    assert len(ends) == len(ids) and ends == sorted(ends) and ends[-1] == len(text)
    # The chat template closes the assistant turn with the same token, so generation and training agree.
    full = tok.apply_chat_template([USER, _bot(text)], tokenize=False)
    assert tok.decode(ids).startswith(text) and full.rstrip().endswith(tok.decode(ids).strip())
    per_token = token_scores([1.0, 1.0, 0.0, 0.0], len(ids), ends, step_spans(text))
    by_token = {tok.decode([i]): s for i, s in zip(ids, per_token)}
    assert by_token["Final"] == 0.0 and by_token["<|im_end|>"] == 0.0 and per_token[0] == 1.0
    first_zero = per_token.index(0.0)
    assert tok.decode(ids[:first_zero]) == "30 * 7 = 210\n4 * 7 = 28\n\n"


# ---- generated arithmetic ------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_arith_solutions_are_scored_correct_and_slips_incorrect(level, tok):
    env_cfg, data_cfg = EnvConfig(difficulty=level, num_problems=30), DatasetConfig()
    env = ArithEnv(env_cfg, data_cfg)
    problems = {p.id: p for p in env.problems("train")}
    examples = arith_examples(env_cfg, data_cfg, "train", 30)
    pairs = arith_pairs(env_cfg, data_cfg, "train", 30, seed=3)
    assert len(examples) == len(pairs) == 30
    for ex, pair in zip(examples, pairs):
        problem = problems[ex.id]
        assert ex.prompt == problem.messages and pair.prompt == problem.messages and ex.response == pair.chosen
        assert env.reward(problem, ex.response).correct
        wrong = env.reward(problem, pair.rejected)
        assert not wrong.correct and wrong.format_ok
        lines = pair.rejected.split("\n")
        assert lines[-1].startswith("Final: ") and len(lines) == len(pair.chosen.split("\n"))
        slip = next(i for i, (a, b) in enumerate(zip(pair.chosen.split("\n"), lines)) if a != b)
        assert pair.scores_rejected == tuple([1.0] * slip + [0.0] * (len(lines) - slip))
        assert pair.scores_chosen == (1.0,) * len(lines)
    assert validate_pairs(pairs, tok, max_len=256) == []
    assert validate_examples(examples, tok, max_len=256) == []


def test_arith_multi_step_solution_text():
    cfg = EnvConfig(difficulty=4, num_problems=40)
    by_op = {}
    for pair in arith_pairs(cfg, DatasetConfig(), "test", 40, seed=0):
        by_op.setdefault(pair.chosen.count("\n"), pair)
    three_steps = by_op[3].chosen.split("\n")  # a two-digit product, split into tens and ones
    a, b = (int(x) for x in three_steps[0].split(" = ")[0].split(" * "))
    c, d = (int(x) for x in three_steps[1].split(" = ")[0].split(" * "))
    assert b == d and a % 10 == 0 and 0 < c < 10
    assert three_steps[2] == f"{a * b} + {c * d} = {a * b + c * d}" and three_steps[3] == f"Final: {a * b + c * d}"


def test_arith_data_is_deterministic_and_prefix_stable():
    cfg, data = EnvConfig(difficulty=5), DatasetConfig()
    first = arith_pairs(cfg, data, "train", 20, seed=7)
    assert first == arith_pairs(cfg, data, "train", 20, seed=7)
    assert first[:5] == arith_pairs(cfg, data, "train", 5, seed=7)
    other = arith_pairs(cfg, data, "train", 20, seed=8)
    assert [p.chosen for p in other] == [p.chosen for p in first]
    assert [p.rejected for p in other] != [p.rejected for p in first]
    assert arith_examples(cfg, data, "test", 3) == arith_examples(cfg, data, "test", 3)
    with pytest.raises(ValueError, match="leave dataset.path unset"):
        arith_examples(cfg, DatasetConfig(path="x.jsonl"), "train", 3)
