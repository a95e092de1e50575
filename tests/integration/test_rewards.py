"""Reward actors on the real cluster: correct scores, and a reward function that raises, hangs or returns NaN
costs that one sample (scored 0, counted), never the run."""

import math
import time

from raylign.config import DatasetConfig, EnvConfig, RewardConfig
from raylign.envs import make_env
from raylign.types import Problem, Score
from raylign.orchestrator.reward_pool import RewardPool


def test_arith_rewards_through_actors(ray_session):
    env_cfg, data_cfg = EnvConfig(name="arith", num_problems=6), DatasetConfig(split="test")
    problems = make_env(env_cfg, data_cfg).problems("test")
    pool = RewardPool(env_cfg, data_cfg, RewardConfig(num_actors=2, timeout_s=5))
    items = [(p, p.answer) for p in problems] + [(p, "no idea") for p in problems[:2]]
    scores = pool.score(items)
    assert [s.reward for s in scores] == [1.0] * 6 + [0.0, 0.0]
    assert [s.correct for s in scores] == [True] * 6 + [False, False]
    assert pool.counters() == {}


def test_faulty_reward_functions_score_zero_and_are_counted(ray_session):
    # Defined inside the test so Ray pickles them by value into the actors.
    def flaky(problem: Problem, completion: str) -> Score:
        if completion == "raise":
            raise RuntimeError("reward bug")
        if completion == "hang":
            time.sleep(30)
        if completion == "nan":
            return Score(reward=math.nan, correct=False, prediction=None, format_ok=False)
        return Score(reward=float(len(completion)), correct=True, prediction=completion, format_ok=True)

    problem = Problem(id="p0", messages=[{"role": "user", "content": "q"}], answer="1")
    pool = RewardPool(EnvConfig(), DatasetConfig(), RewardConfig(num_actors=1, timeout_s=1.0), reward_fn=flaky)
    start = time.perf_counter()
    scores = pool.score([(problem, t) for t in ["ok", "raise", "hang", "nan", "four"]])
    elapsed = time.perf_counter() - start
    assert [s.reward for s in scores] == [2.0, 0.0, 0.0, 0.0, 4.0]
    assert [s.info.get("reward_event") for s in scores] == [None, "error", "timeout", "nan", None]
    assert "RuntimeError: reward bug" in scores[1].info["detail"]
    assert elapsed < 10  # the hung sample cost its timeout, not 30 s
    assert pool.counters() == {"error": 1, "timeout": 1, "nan": 1}
    # The pool keeps working after the hang.
    assert [s.reward for s in pool.score([(problem, "abc")])] == [3.0]
