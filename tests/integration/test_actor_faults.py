"""Dead and wedged actors on the real stack (local Ray, vLLM on CPU, tiny-random-llama): a generator replica
SIGKILLed mid-call or wedged past its deadline, a reward actor and the reference actor killed. Each is
replaced, its work redone, the fault counted; past the restart limit the pool raises with a one-line reason."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from safetensors.torch import save_file

from raylign.config import (
    DatasetConfig,
    EnvConfig,
    FaultConfig,
    GeneratorConfig,
    ModelConfig,
    RewardConfig,
    TrainerConfig,
)
from raylign.types import Problem, Score
from raylign.models import load_hf_model
from raylign.orchestrator.generator_pool import GeneratorPool, GeneratorPoolError
from raylign.orchestrator.reference_pool import ReferenceClient, ReferenceClientError
from raylign.orchestrator.reward_pool import RewardPool, RewardPoolError
from raylign.types import TrainBatch


def write_perturbed_weights(tiny_model, path) -> str:
    """The tiny model's weights, moved enough that greedy outputs change: a replica that skipped loading
    them would answer differently from one that loaded them."""
    gen = torch.Generator().manual_seed(11)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=gen).to(v.dtype)).contiguous()
             for k, v in load_hf_model(tiny_model, "bfloat16").state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path))
    return str(path)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def hf_pool(tiny_model, fault: FaultConfig, **gen) -> GeneratorPool:
    cfg = GeneratorConfig(**{"backend": "hf", "num_replicas": 2, "num_cpus": 0.5, "batch_size": 2,
                             "max_new_tokens": 8, "temperature": 1.0, "n": 2, **gen})
    return GeneratorPool(tiny_model, ModelConfig(name=tiny_model), cfg, fault)


def test_generator_killed_mid_call_is_replaced_at_the_current_version(ray_session, tiny_model, tmp_path):
    cfg = GeneratorConfig(backend="vllm", num_replicas=2, num_cpus=0.5, batch_size=2, max_new_tokens=96,
                          kv_cache_gb=0.25, temperature=1.0, n=2)
    pool = GeneratorPool(tiny_model, ModelConfig(name=tiny_model), cfg)
    try:
        pool.load_weights(write_perturbed_weights(tiny_model, tmp_path / "w.safetensors"), 3)
        pool.reseed(5)
        pool.generate([[1, 2, 3]] * 2, pool.spec(max_new_tokens=4))  # warm-up: the first call is slow
        old_pid = ray.get(pool.actors[1].pid.remote())
        prompts = [[1, 2, 3 + i] for i in range(16)]  # 8 chunks of 2 prompts: both replicas stay busy
        first_chunk = threading.Event()
        with ThreadPoolExecutor(1) as ex:
            started = time.perf_counter()
            call = ex.submit(pool.generate, prompts, pool.spec(ignore_eos=True), lambda n: first_chunk.set())
            assert first_chunk.wait(120)
            assert not call.done()  # the kill lands while the call still has chunks to run
            kill(old_pid)
            killed = time.perf_counter()
            groups = call.result(timeout=300)
        done = time.perf_counter()
        print(f"\nvLLM kill: call {done - started:.1f} s, kill -> completion {done - killed:.1f} s")
        assert [len(g) for g in groups] == [2] * 16
        assert [c.prompt_ids for g in groups for c in g] == [p for p in prompts for _ in range(2)]
        assert {c.policy_version for g in groups for c in g} == {3}
        assert all(len(c.token_ids) == 96 for g in groups for c in g)
        assert pool.fault_counters() == {"fault/generator_restarts": 1}
        # The replacement (same index, new process) came back at version 3 with the perturbed weights: its
        # greedy answers match replica 0's.
        assert pool.policy_versions() == [3, 3]
        assert ray.get(pool.actors[1].pid.remote()) != old_pid
        greedy = pool.generate([[5, 6, 7]] * 4, pool.spec(temperature=0.0, n=1, max_new_tokens=12))
        assert {g[0].replica for g in greedy} == {0, 1}
        assert len({tuple(g[0].token_ids) for g in greedy}) == 1
        assert {g[0].policy_version for g in greedy} == {3}
        assert pool.fault_counters() == {"fault/generator_restarts": 1}
    finally:
        pool.shutdown()


def test_wedged_generator_is_replaced_after_its_deadline(ray_session, tiny_model):
    pool = hf_pool(tiny_model, FaultConfig(), timeout_s=6)  # a chunk takes < 1 s
    try:
        pool.reseed(1)
        ray.get(pool.actors[0].inject_hang.remote(60))
        prompts = [[1, 2, 3 + i] for i in range(8)]
        started = time.perf_counter()
        groups = pool.generate(prompts, pool.spec())
        elapsed = time.perf_counter() - started
        print(f"\nwedged replica: call {elapsed:.1f} s (deadline 6 s, hang 60 s)")
        assert 6 <= elapsed < 31  # the deadline, the redone chunk; not the 60 s hang
        assert [len(g) for g in groups] == [2] * 8
        assert [g[0].prompt_ids for g in groups] == prompts
        assert pool.fault_counters() == {"fault/generator_restarts": 1}
        assert pool.policy_versions() == [0, 0]  # the replacement is up; later calls use both replicas
        assert {g[0].replica for g in pool.generate(prompts, pool.spec())} == {0, 1}
    finally:
        pool.shutdown()


def test_generator_faults_past_the_limit_raise_naming_the_replica(ray_session, tiny_model):
    pool = hf_pool(tiny_model, FaultConfig(max_generator_restarts=0))
    try:
        kill(ray.get(pool.actors[1].pid.remote()))
        with pytest.raises(GeneratorPoolError, match=r"^generator replica 1 died \(\w+Error\); 0 restarts already, "
                                                     r"fault.max_generator_restarts=0$"):
            pool.generate([[1, 2, 3 + i] for i in range(4)], pool.spec())
        assert pool.fault_counters() == {"fault/generator_restarts": 0}
    finally:
        pool.shutdown()


def slow_length(problem: Problem, completion: str) -> Score:
    time.sleep(0.4)  # so a call lasts long enough to kill an actor in the middle of it
    return Score(reward=float(len(completion)), correct=True, prediction=completion, format_ok=True)


def test_reward_actor_killed_between_and_during_calls(ray_session):
    # concurrency=1: each actor scores its 3 items one after another (1.2 s), so a kill lands mid-call
    pool = RewardPool(EnvConfig(), DatasetConfig(), RewardConfig(num_actors=2, timeout_s=5, concurrency=1),
                      reward_fn=slow_length, fault_cfg=FaultConfig(max_actor_restarts=3))
    problem = Problem(id="p0", messages=[{"role": "user", "content": "q"}], answer="1")
    items = [(problem, "x" * (i + 1)) for i in range(6)]  # actor 0 scores items 0, 2, 4; actor 1 items 1, 3, 5
    assert [s.reward for s in pool.score(items)] == [1, 2, 3, 4, 5, 6]
    kill(ray.get(pool.actors[0].pid.remote()))  # between calls
    scores = pool.score(items)
    assert [s.reward for s in scores] == [0, 2, 0, 4, 0, 6]
    assert [s.info.get("reward_event") for s in scores[::2]] == ["actor_failure"] * 3
    assert pool.fault_counters() == {"fault/reward_restarts": 1}
    pid = ray.get(pool.actors[1].pid.remote())  # asked first: during the call the actor is busy scoring
    with ThreadPoolExecutor(1) as ex:
        call = ex.submit(pool.score, items)
        time.sleep(0.6)  # both actors are in their 1.2 s of scoring
        assert not call.done()
        kill(pid)
        scores = call.result(timeout=60)
    assert [s.reward for s in scores] == [1, 0, 3, 0, 5, 0]
    assert pool.fault_counters() == {"fault/reward_restarts": 2}
    kill(ray.get(pool.actors[0].pid.remote()))
    assert pool.counters() == {"actor_failures": 2}  # a dead actor's counters call is a replacement too
    assert pool.fault_counters() == {"fault/reward_restarts": 3}
    assert [s.reward for s in pool.score(items)] == [1, 2, 3, 4, 5, 6]  # the replacements score normally
    kill(ray.get(pool.actors[1].pid.remote()))
    with pytest.raises(RewardPoolError, match=r"^reward actor 1 died .*fault.max_actor_restarts=3$"):
        pool.score(items)
    pool.shutdown()


def test_reference_actor_killed_gives_the_same_logprobs(ray_session, tiny_model):
    batch = TrainBatch(prompt_ids=[[1, 2, 3], [4, 5, 6, 7]], completion_ids=[[8, 9], [10, 11, 12]],
                       loss_mask=[[1, 1], [1, 1, 1]])
    ref = ReferenceClient(tiny_model, ModelConfig(name=tiny_model), TrainerConfig(num_cpus_per_worker=0.5),
                          FaultConfig(max_actor_restarts=1))
    try:
        before = ref.logprobs(batch)
        assert [len(x) for x in before] == [2, 3] and all(v < 0 for x in before for v in x)
        old_pid = ref.pid()
        kill(old_pid)
        started = time.perf_counter()
        assert ref.logprobs(batch) == before  # frozen weights: the retried call is exact
        print(f"\nreference kill: next logprobs call {time.perf_counter() - started:.1f} s")
        assert ref.fault_counters() == {"fault/reference_restarts": 1}
        assert ref.pid() != old_pid
        kill(ref.pid())
        with pytest.raises(ReferenceClientError, match=r"^reference actor logprobs: died"):
            ref.logprobs(batch)
    finally:
        ref.shutdown()


def test_retriever_actor_killed_is_replaced_and_searched_again(ray_session, tmp_path):
    from raylign.config import load_config
    from raylign.orchestrator.retriever_pool import RetrieverPool, RetrieverPoolError

    cfg = load_config(None, [f"rag.index_dir={tmp_path}", "rag.synthetic_num_facts=20"], environ={})
    pool = RetrieverPool(cfg, fault_cfg=FaultConfig(max_actor_restarts=1))
    try:
        queries = ["Who founded the guild?", "Which river is longest?", "When was it built?"]
        before = pool.search(queries, 3)
        ray.kill(pool.actors[0])  # RetrieverActor has no pid hook; ray.kill ends its process all the same
        assert pool.search(queries, 3) == before  # the read-only index makes the retried search exact
        assert pool.fault_counters() == {"fault/retriever_restarts": 1}
        ray.kill(pool.actors[0])
        with pytest.raises(RetrieverPoolError, match=r"^retriever actor 0 died .*fault.max_actor_restarts=1$"):
            pool.search(queries, 3)
    finally:
        pool.shutdown()
