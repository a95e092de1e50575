"""The AutoDSPy env (``env.name=dspy``): the policy writes a pipeline, DSPy runs it on a task model, the answer
is rewarded by the regex stage and then, where that scores 0, by an LLM judge.

The policy sees the question and the action space (``actions.action_prompt``) and replies with one line such
as ``CoT | question -> answer``. ``reward`` parses it strictly (a bad reply scores 0 and its reason is
counted), builds the DSPy program, runs it on the question (with HotpotQA's passages as context) on the task
model, and scores the program's answer. With ``dspy.fixed_pipeline`` the seed's fixed ``question ->
reasoning -> answer`` pipeline runs too and the reward is the max of the two.

The task model and the judge are plain functions here (``Complete``: conversations in, replies out); the
reward actor supplies them, backed by generator actors. Many samples are scored at once, one per thread
(``reward.concurrency``), and each model's calls from those threads are batched (``BatchingCompleter``).
``correct`` is the regex stage's exact verdict: accuracy never rests on the judge's word.
"""

from __future__ import annotations

from raylign.config import DatasetConfig, DspyConfig, EnvConfig, JudgeConfig
from raylign.envs.dspy.actions import SIGNATURES, Action, ParseFailure, parse_action
from raylign.envs.dspy.data import file_questions, offline_questions, question_problem
from raylign.envs.dspy.lm import BatchingCompleter, Complete, make_lm
from raylign.envs.dspy.program import ProgramRun, run_fixed_pipeline, run_program
from raylign.envs.dspy.rewards import combine, needs_judge, regex_score
from raylign.envs.judge import judge_answer
from raylign.types import Problem, Score


def pipeline_slug(action: Action | None) -> str:
    """A metric-safe name of a pipeline (MLflow keys allow no '|' or '>'): ``ChainOfThought: question to answer``."""
    if action is None:
        return "unparsed"
    return f"{action.module}: {', '.join(action.inputs)} to {', '.join(action.outputs)}"


class DspyEnv:
    name = "dspy"

    def __init__(self, env_cfg: EnvConfig, dataset_cfg: DatasetConfig, cfg: DspyConfig,
                 judge_cfg: JudgeConfig | None = None, task: Complete | None = None, judge: Complete | None = None):
        self.env_cfg, self.dataset_cfg, self.cfg = env_cfg, dataset_cfg, cfg
        self.judge_cfg = judge_cfg or JudgeConfig()
        self.signatures = tuple(cfg.signatures or SIGNATURES)
        # A 50 ms window: threads reach their first call spread over tens of ms (DSPy formats prompts under
        # the GIL); with 5 ms, 36 conversations took 12 generate calls. A call itself takes seconds.
        self.task = BatchingCompleter(task, wait_s=0.05) if task is not None else None
        self.judge = BatchingCompleter(judge, wait_s=0.05) if judge is not None else None
        self.lm = make_lm(self.task, cfg.task_model, cfg.temperature, cfg.max_new_tokens) if self.task else None

    def problems(self, split: str) -> list[Problem]:
        cfg = self.cfg
        if cfg.gsm8k_path or cfg.hotpotqa_path:
            questions = file_questions(cfg.gsm8k_path, cfg.hotpotqa_path, split, cfg.limit_each, self.env_cfg.seed)
        else:
            questions = offline_questions(split, cfg.num_math, cfg.num_multihop, self.env_cfg.seed,
                                          self.env_cfg.difficulty)
        return [question_problem(q, cfg.modules, self.signatures) for q in questions]

    def reward(self, problem: Problem, completion: str) -> Score:
        if self.lm is None:
            raise RuntimeError("the dspy env scores only where a task model is attached (a reward actor)")
        action = parse_action(completion, self.cfg.modules, self.signatures)
        kind = problem.meta.get("kind", "")
        if isinstance(action, ParseFailure):
            return Score(0.0, False, None, False, {
                "components": {"dspy_parsed": 0.0, f"dspy_parse_{action.reason}": 1.0},
                "tags": {"pipeline": pipeline_slug(None), "kind": kind}})
        question, context = problem.meta["question"], problem.meta.get("context")
        run = run_program(action, question, context, self.lm)
        reward, parts = self._stage_reward(run, problem)
        components = {"dspy_parsed": 1.0, "dspy_lm_calls": float(run.lm_calls), "dspy_program_s": run.seconds,
                      **parts}
        if run.event:
            components[f"dspy_{run.event}"] = 1.0
        if self.cfg.fixed_pipeline:
            fixed = run_fixed_pipeline(question, context, self.lm)
            fixed_reward, fixed_parts = self._stage_reward(fixed, problem)
            components.update({"dspy_fixed_reward": fixed_reward, "dspy_fixed_judged": fixed_parts["dspy_judged"]})
            reward = max(reward, fixed_reward)
        return Score(reward, parts["dspy_regex"] == 1.0, run.output, True, {
            "components": components, "tags": {"pipeline": pipeline_slug(action), "kind": kind},
            "pipeline": action.text})

    def _stage_reward(self, run: ProgramRun, problem: Problem) -> tuple[float, dict[str, float]]:
        """The seed's two stages on one program run: regex, then the judge if the regex scored 0."""
        regex, _ = regex_score(run.output, problem.answer, self.cfg.text_metric)
        verdict, judged = None, needs_judge(regex, run.output) and self.judge is not None
        if judged:
            ask = lambda messages: self.judge(messages, 0.0, self.judge_cfg.max_new_tokens)  # noqa: E731
            verdict, _ = judge_answer(ask, problem.meta["question"], problem.answer, run.output,
                                      self.judge_cfg.template)
        parts = {"dspy_regex": regex, "dspy_judged": float(judged),
                 "dspy_judge_unreadable": float(judged and verdict is None)}
        return combine(regex, verdict), parts
