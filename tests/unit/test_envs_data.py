"""Loading records from files (and the hub, faked), the GSM8K and MATH envs built on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylign.config import DatasetConfig, EnvConfig
from raylign.envs import DataError, Gsm8kEnv, MathEnv, make_env
from raylign.envs.answers import normalize_number
from raylign.envs.data import field, load_records, question_text

SHARED = Path(__file__).parents[2].parent / "shared/data"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_template_joins_two_fields_and_limit(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"problem": f"p{i}", "context": f"c{i}", "answer": i} for i in range(5)])
    cfg = DatasetConfig(path=path, question_template="{problem}\n{context}", limit=3)
    records, source = load_records(cfg)
    assert source == path and len(records) == 3
    assert question_text(records[2], cfg, source, 2) == "p2\nc2"
    assert field(records[2], "answer", source, 2) == "2"


def test_missing_field_names_file_row_and_field(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"question": "q0", "answer": "1"}] * 17 + [{"answer": "2", "foo": "x"}])
    records, source = load_records(DatasetConfig(path=path))
    with pytest.raises(DataError, match=r"data\.jsonl: row 17: missing field 'question' \(fields: answer, foo\)"):
        question_text(records[17], DatasetConfig(path=path), source, 17)
    with pytest.raises(DataError, match=r"row 17: missing field 'bar'"):
        question_text(records[17], DatasetConfig(path=path, question_template="{bar} {answer}"), source, 17)


def test_parquet(tmp_path):
    import datasets

    path = str(tmp_path / "data.parquet")
    rows = [{"question": "a", "answer": "#### 3"}, {"question": "b", "answer": "#### 4"}]
    datasets.Dataset.from_list(rows).to_parquet(path)
    problems = Gsm8kEnv(EnvConfig(name="gsm8k"), DatasetConfig(path=path)).problems("test")
    got = [(p.id, p.answer, p.messages[1]["content"]) for p in problems]
    assert got == [("gsm8k-test-0", "3", "a"), ("gsm8k-test-1", "4", "b")]


def test_missing_file_and_malformed_line(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_records(DatasetConfig(path=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2"):
        load_records(DatasetConfig(path=str(bad)))


def test_split_placeholder(tmp_path):
    for split in ("train", "test"):
        _jsonl(tmp_path / f"{split}.jsonl", [{"question": split, "answer": "#### 1"}])
    env = Gsm8kEnv(EnvConfig(name="gsm8k"), DatasetConfig(path=str(tmp_path / "{split}.jsonl")))
    assert env.problems("train")[0].messages[1]["content"] == "train"
    assert env.problems("test")[0].messages[1]["content"] == "test"


def test_offline_hub_gives_one_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    hint = r"set dataset.path to a local jsonl \(e.g. ../shared/data/gsm8k/test.jsonl\)"
    with pytest.raises(DataError, match=rf"openai/gsm8k.*{hint}"):
        make_env(EnvConfig(name="gsm8k"), DatasetConfig()).problems("test")
    with pytest.raises(DataError, match="HuggingFaceH4/MATH-500.*math500/test.jsonl"):
        make_env(EnvConfig(name="math"), DatasetConfig()).problems("test")


def test_gsm8k_env(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "answer": "1000 + 200\n#### 1,200"},
                                         {"question": "Broken", "answer": "no marker"}])
    env = Gsm8kEnv(EnvConfig(name="gsm8k", system_prompt="Custom."), DatasetConfig(path=path, limit=1))
    (problem,) = env.problems("test")
    assert (problem.id, problem.answer) == ("gsm8k-test-0", "1200")
    assert problem.messages == [{"role": "system", "content": "Custom."}, {"role": "user", "content": "How many?"}]
    assert env.reward(problem, "Final: 1,200").reward == 1.0
    assert env.reward(problem, "Final: 1201").reward == 0.1
    assert env.reward(problem, "1200").reward == 0.0
    lenient = Gsm8kEnv(EnvConfig(name="gsm8k", lenient=True), DatasetConfig(path=path))
    assert lenient.reward(problem, "so 1200").reward == 1.0
    with pytest.raises(DataError, match=r"g\.jsonl: row 1: field 'answer' has no '#### <answer>'"):
        lenient.problems("test")


def test_math_env(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [
        {"problem": "Half?", "solution": r"It is \boxed{\frac{1}{2}}.", "answer": "\\frac{1}{2}", "level": 2},
        {"problem": "Two?", "solution": r"First \boxed{1}, no: \boxed{2}."},  # no answer: solution's last box
    ])
    env = MathEnv(EnvConfig(name="math"), DatasetConfig(path=path))
    half, two = env.problems("test")
    assert (half.id, half.answer, two.answer) == ("math-test-0", r"\frac{1}{2}", "2")
    assert half.messages[1]["content"] == "Half?" and "\\boxed{}" in half.messages[0]["content"]
    assert half.meta["level"] == 2
    assert env.reward(half, r"so \boxed{0.5}").reward == 1.0
    assert env.reward(half, r"\boxed{\frac{1}{3}}").reward == 0.1
    assert env.reward(two, "the answer is 2").reward == 0.0
    assert MathEnv(EnvConfig(name="math", lenient=True), DatasetConfig(path=path)).reward(two, "it is 2").reward == 1.0


@pytest.mark.skipif(not (SHARED / "gsm8k/test.jsonl").exists(), reason="shared GSM8K copy absent")
def test_shared_gsm8k_test_file():
    env = Gsm8kEnv(EnvConfig(name="gsm8k"), DatasetConfig(path=str(SHARED / "gsm8k/test.jsonl")))
    problems = env.problems("test")
    assert len(problems) == 1319
    assert all(normalize_number(p.answer) == p.answer for p in problems)
    assert problems[0].answer == "18" and problems[17].id == "gsm8k-test-17"

