"""DspyEnv.reward end to end with real DSPy and scripted task-model / judge functions, the judge stage for
math envs, the pipeline metrics and plot, and the preflight checks of the dspy config."""

import pytest

from raylign.config import Config, ConfigError, load_config
from raylign.envs import make_env
from raylign.envs.judge import judged_score
from raylign.orchestrator.evaluate import pipeline_shares
from raylign.orchestrator.pipeline_plot import pipeline_table, plot_pipeline_shares
from raylign.orchestrator.preflight import check_env_models
from raylign.types import Problem, Score


def _reply(fields: dict[str, str]) -> str:
    return "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in fields.items()) + "[[ ## completed ## ]]"


class Scripted:
    """A task model: answers every conversation with ``answer`` in DSPy's chat format; counts conversations."""

    def __init__(self, answer: str, judge: str = "Score: 8"):
        self.answer, self.judge, self.seen = answer, judge, []

    def task(self, conversations, temperature, max_tokens):
        self.seen += conversations
        out = []
        for messages in conversations:
            fields = [line.split("`")[1] for line in messages[0]["content"].splitlines()
                      if line[:1].isdigit() and "`" in line and "Your output" not in line]
            outputs = messages[0]["content"].split("Your output fields are:")[1].split("All interactions")[0]
            names = [line.split("`")[1] for line in outputs.splitlines() if "`" in line]
            out.append(_reply({n: (self.answer if n == names[-1] else "thinking") for n in names}))
        return out

    def judge_fn(self, conversations, temperature, max_tokens):
        self.seen += conversations
        return [self.judge] * len(conversations)


def _env(scripted: Scripted, *overrides: str):
    cfg = load_config(None, ["env.name=dspy", "dspy.num_math=4", "dspy.num_multihop=4", *overrides], environ={})
    return make_env(cfg.env, cfg.dataset, cfg.rag, cfg=cfg,
                    models={"task": scripted.task, "judge": scripted.judge_fn}), cfg


def test_a_right_answer_scores_one_without_the_judge():
    scripted = Scripted("unused")
    env, _ = _env(scripted)
    problem = next(p for p in env.problems("test") if p.meta["kind"] == "math")
    scripted.answer = f"The answer is [{problem.answer}]"
    score = env.reward(problem, "CoT | question -> answer")
    assert score.reward == 1.0 and score.correct and score.format_ok
    assert score.info["components"]["dspy_judged"] == 0.0 and score.info["components"]["dspy_lm_calls"] == 1.0
    assert score.info["tags"] == {"pipeline": "ChainOfThought: question to answer", "kind": "math"}
    assert len(scripted.seen) == 1 and "[[ ## question ## ]]" in scripted.seen[0][-1]["content"]


def test_a_wrong_answer_goes_to_the_judge_whose_verdict_is_the_reward_but_not_correctness():
    scripted = Scripted("no idea", judge="It matches.\nScore: 7")
    env, _ = _env(scripted)
    problem = env.problems("test")[0]
    score = env.reward(problem, "Predict | question -> answer")
    assert score.reward == pytest.approx(0.7) and not score.correct
    assert score.info["components"]["dspy_judged"] == 1.0 and score.info["components"]["dspy_judge_unreadable"] == 0.0
    assert len(scripted.seen) == 2 and "Reference answer:" in scripted.seen[1][-1]["content"]
    scripted.judge = "I cannot tell"  # an unreadable verdict scores 0 and is counted
    unread = env.reward(problem, "Predict | question -> answer")
    assert unread.reward == 0.0 and unread.info["components"]["dspy_judge_unreadable"] == 1.0


def test_a_multihop_question_sends_its_context_to_the_task_model_not_to_the_policy():
    scripted = Scripted("x")
    env, _ = _env(scripted)
    problem = next(p for p in env.problems("test") if p.meta["kind"] == "multihop")
    paragraphs = problem.meta["context"].split("\n\n")
    assert len(paragraphs) == 3
    hidden = [p for p in paragraphs if p not in problem.messages[-1]["content"]]
    assert hidden == paragraphs  # the policy sees the question only
    env.reward(problem, "Predict | question -> answer")
    assert all(p in scripted.seen[0][-1]["content"] for p in paragraphs)


def test_bad_actions_score_zero_with_their_reason_and_call_no_model():
    scripted = Scripted("1")
    env, _ = _env(scripted)
    problem = env.problems("test")[0]
    for text, reason in [("", "empty"), ("ReAct | question -> answer", "unknown_module"),
                         ("CoT | question -> verdict", "unknown_signature"), ("CoT | question -> answer!", "trailing_text")]:
        score = env.reward(problem, text)
        assert score.reward == 0.0 and not score.format_ok
        assert score.info["components"] == {"dspy_parsed": 0.0, f"dspy_parse_{reason}": 1.0}
    assert scripted.seen == []


def test_fixed_pipeline_reward_is_the_max_of_the_two():
    scripted = Scripted("unused", judge="Score: 0")
    env, _ = _env(scripted, "dspy.fixed_pipeline=true")
    problem = env.problems("test")[0]
    scripted.answer = f"[{problem.answer}]"
    score = env.reward(problem, "Predict | text -> summary")
    assert score.reward == 1.0 and score.info["components"]["dspy_fixed_reward"] == 1.0
    assert len(scripted.seen) == 3  # the chosen program once, the fixed pipeline's two stages


def test_the_judge_stage_for_math_envs_lifts_only_wrong_replies():
    problem = Problem("p", [{"role": "user", "content": "What is 2+2?"}], "4")
    asked = []

    def judge(messages):
        asked.append(messages)
        return "Score: 10"

    right = Score(1.0, True, "4", True)
    assert judged_score(right, judge, "What is 2+2?", "4", "Final: 4") is right and asked == []
    wrong = judged_score(Score(0.1, False, "5", True), judge, "What is 2+2?", "4", "two plus two is four")
    assert wrong.reward == 1.0 and not wrong.correct and wrong.info["judge/called"] == 1 and len(asked) == 1
    assert judged_score(Score(0.0, False, None, False), judge, "q", "4", "  ").reward == 0.0  # nothing said
    unreadable = judged_score(Score(0.1, False, "5", True), lambda m: "hmm", "q", "4", "five")
    assert unreadable.reward == 0.1 and unreadable.info["judge/unreadable"] == 1
    broken = judged_score(Score(0.0, False, "5", True), lambda m: 1 / 0, "q", "4", "five")
    assert broken.reward == 0.0 and broken.info["judge/unreadable"] == 1


def test_pipeline_shares_per_kind_and_the_plot(tmp_path):
    def s(pipeline, kind, correct):
        return Score(float(correct), correct, None, True, {"tags": {"pipeline": pipeline, "kind": kind}})

    scores = [s("Predict: question to answer", "math", True), s("Predict: question to answer", "math", False),
              s("unparsed", "math", False), s("ChainOfThought: question to answer", "multihop", True),
              Score(0.0, False, None, False)]
    shares = pipeline_shares(scores)
    assert shares == pytest.approx({
        "pipeline/math/Predict: question to answer": 2 / 3, "pipeline/math/unparsed": 1 / 3,
        "pipeline/multihop/ChainOfThought: question to answer": 1.0,
        "pipeline_accuracy/math/Predict: question to answer": 0.5, "pipeline_accuracy/math/unparsed": 0.0,
        "pipeline_accuracy/multihop/ChainOfThought: question to answer": 1.0,
        "accuracy/math": 1 / 3, "accuracy/multihop": 1.0})
    evals = {"eval_before": {"accuracy": 0.1, **shares}, "eval_after": {"pipeline/math/unparsed": 1.0}}
    assert pipeline_table(evals)["math"]["unparsed"] == {"eval_before": pytest.approx(1 / 3), "eval_after": 1.0}
    assert plot_pipeline_shares(evals, tmp_path / "p.png").stat().st_size > 5000
    assert plot_pipeline_shares({"eval_before": {"accuracy": 0.5}}, tmp_path / "none.png") is None


def test_preflight_names_a_bad_dspy_action_space_and_judge_template():
    with pytest.raises(ConfigError, match="dspy.modules / dspy.signatures: unknown DSPy modules"):
        check_env_models(load_config(None, ["env.name=dspy", "dspy.modules=[Chain]"], environ={}))
    with pytest.raises(ConfigError, match="dspy.modules / dspy.signatures: signature"):
        check_env_models(load_config(None, ["env.name=dspy", "dspy.signatures=['question answer']"], environ={}))
    with pytest.raises(ConfigError, match=r"reward.judge.template: unknown field\(s\) \['gold'\]"):
        check_env_models(load_config(None, ["reward.judge.template='{question} {gold}'"], environ={}))
    check_env_models(Config())  # the defaults pass
