"""A real multi-node Ray cluster on this machine: `ray start --head` (node A, custom resource node_a) plus two
`ray start --address` workers (B: node_b, C: node_c), each a raylet with its own temp dir and node id.
`raylign train` attaches to it with relative paths; the trainer is pinned to A, the vLLM generator to B and
the reward actors to C. With weight_transport=auto the replica on B gets its weights over Ray, never by a
file written on A, and the canary confirms it serves the trainer's log-probs. Node B has a model cache of its
own (RAYLIGN_CACHE_DIR), as a second machine would: its generator builds the model there itself.
Checkpoints and the final model go to S3 (``train.storage``; moto's server on this machine speaks the S3
protocol): trainer rank 0 uploads them from node A, a resume in a fresh cluster reads them back from there, and
``raylign export`` writes a local HF folder from the bucket. Retrievers pinned to node C, whose index folder
is its own (RAYLIGN_INDEX_DIR), unpack the index the driver built and shipped through the object store."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raylign import storage
from tests.integration.helpers import CLI_GRPO, PRESET, free_port, start_ray_node, stop_ray_node


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory, s3_bucket):
    # os.environ now holds the S3 credentials s3_bucket set: the raylets pass them on to their workers
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}  # workers and drivers present the token
    env.pop("RAY_ADDRESS", None)
    gcs = free_port()
    nodes = [start_ray_node(env, num_cpus=4, resources={"node_a": 1}, gcs_port=gcs, dashboard_port=free_port())]
    time.sleep(8)  # the head's GCS must be up before workers join
    cache_b, index_c = tmp_path_factory.mktemp("node_b_cache"), tmp_path_factory.mktemp("node_c_indexes")
    own = {"node_b": {"RAYLIGN_CACHE_DIR": str(cache_b)}, "node_c": {"RAYLIGN_INDEX_DIR": str(index_c)}}
    def worker(name: str):
        return start_ray_node({**env, **own[name]}, head_port=gcs, num_cpus=3, resources={name: 1})

    nodes += [worker(name) for name in ("node_b", "node_c")]
    probe = "import ray; ray.init(address='127.0.0.1:%d'); print(len([n for n in ray.nodes() if n['Alive']]))" % gcs
    deadline, restarted = time.time() + 240, set()
    while True:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                             check=False)
        if out.stdout.strip().endswith("3") or time.time() > deadline:
            break
        # Under load (make test's other worker) a raylet can miss Ray's start-up timeout and its `ray start`
        # exits: start that node once more.
        for i, name in ((1, "node_b"), (2, "node_c")):
            if nodes[i][0].poll() is not None and name not in restarted:
                restarted.add(name)
                with contextlib.suppress(ProcessLookupError):  # its group may be gone with it
                    stop_ray_node(*nodes[i])
                nodes[i] = worker(name)
        time.sleep(3)
    try:
        assert out.stdout.strip().endswith("3"), out.stdout + out.stderr[-2000:]
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "cache_b": cache_b, "index_c": index_c, "s3": s3_bucket}
    finally:
        for proc, temp_dir in reversed(nodes):
            stop_ray_node(proc, temp_dir)


def test_generators_on_another_node_get_their_weights_over_ray(three_nodes, tmp_path):
    store = storage.join(three_nodes["s3"], "mn")
    run = [*[a for a in CLI_GRPO if not a.startswith(("ray.num_cpus", "generator.backend"))],
           f"ray.address={three_nodes['address']}", "train.steps=2", "train.eval_before=false",
           "trainer.resources_per_worker={node_a: 0.01}", "generator.resources={node_b: 0.01}",
           "reward.resources={node_c: 0.01}", "trainer.weight_transport=auto", "output_dir=runs/mn",
           "ray.placement=spread",  # placement groups from the CLI: the pinned roles still land where pinned
           f"train.storage={store}"]
    proc = subprocess.run([sys.executable, "-m", "raylign", "train", str(PRESET), *run], cwd=tmp_path,
                          env=three_nodes["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs/mn/summary.json").read_text())
    layout = summary["weight_sync"]
    assert [r["transport"] for r in layout["replicas"]] == ["ray"]
    assert layout["replicas"][0]["node"] != layout["trainer_node"]
    assert "replica 0 on node" in proc.stdout and "by ray" in proc.stdout
    assert summary["policy_version"] == 2 and summary["final_model_dir"] == storage.join(store, "final_model")
    assert {"config.json", "model.safetensors"} <= set(storage.list_files(summary["final_model_dir"]))
    assert storage.list_dirs(storage.join(store, "checkpoints")) == ["step-000001", "step-000002"]
    assert not (tmp_path / "runs/mn/checkpoints").exists() and not (tmp_path / "runs/mn/final_model").exists()
    # the generator on B resolved tiny-random-llama on its own node, not through the driver's cache path
    assert (three_nodes["cache_b"] / "tiny-random-llama-v1" / "raylign_model.json").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = summary["mlflow_run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "sync/replicas_ray")] == [1.0, 1.0]
    assert [m.value for m in client.get_metric_history(run_id, "sync/replicas_file")] == [0.0, 0.0]
    canary = client.get_metric_history(run_id, "sync/canary_gap")  # the first sync is always checked
    assert canary and all(0 <= m.value <= 0.15 for m in canary)
    rows = [json.loads(line) for line in (tmp_path / "runs/mn/rollouts.jsonl").read_text().splitlines()]
    assert {r["policy_version"] for r in rows if r["step"] == 2} == {1}

    # The run's checkpoint resumes in a fresh cluster: a new local Ray cluster (other node ids, no node_a/b/c
    # resources) takes it from S3 and trains step 3 on top of the two steps trained across nodes.
    fresh_env = {k: v for k, v in three_nodes["env"].items() if k != "RAY_ADDRESS"}
    resumed = subprocess.run([sys.executable, "-m", "raylign", "train", str(PRESET), *CLI_GRPO, "output_dir=runs/mn",
                              "train.eval_before=false", f"train.storage={store}", "--resume"], cwd=tmp_path, env=fresh_env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((tmp_path / "runs/mn/summary.json").read_text())
    assert after["steps"] == 3 and after["policy_version"] == 3 and after["mlflow_run_id"] == run_id
    assert after["weight_sync"]["trainer_node"] != layout["trainer_node"]  # another cluster's node
    rows = [json.loads(line) for line in (tmp_path / "runs/mn/rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 2, 3]
    assert {r["policy_version"] for r in rows if r["step"] == 3} == {2}
    assert [m.step for m in client.get_metric_history(run_id, "sync/replicas_ray")][:2] == [1, 2]
    assert storage.list_dirs(storage.join(store, "checkpoints"))[-1] == "step-000003"

    # `raylign export` takes the storage location and writes a local folder transformers loads
    out = subprocess.run([sys.executable, "-m", "raylign", "export", store, "--out", "runs/mn/export"], cwd=tmp_path,
                         env=fresh_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "runs/mn/export").num_parameters() > 0


def test_retrievers_on_a_node_without_the_index_get_the_drivers_copy(three_nodes, tmp_path):
    script = textwrap.dedent(f"""
        import json, ray
        from raylign.config import load_config
        from raylign.envs.rag.store import build_store, qa_records
        from raylign.orchestrator.retriever_pool import RetrieverPool
        cfg = load_config(None, ["rag.index_dir={tmp_path / 'driver_indexes'}", "rag.synthetic_num_facts=40",
                                 "rag.num_retrievers=2", "rag.retriever_resources={{node_c: 0.01}}"], environ={{}})
        ray.init(address="{three_nodes['address']}")
        store = build_store(cfg, progress=False)
        pool = RetrieverPool(cfg)
        questions = [r.question for r in qa_records(cfg, "all")[:20]]
        ids = lambda hits: [[h.chunk_id for h in hs] for hs in hits]
        print("RESULT", json.dumps({{"placement": pool.placement, "index": store.path.name,
                                    "head": ray.get_runtime_context().get_node_id(),
                                    "same": ids(pool.search(questions, 3, "bm25")) == ids(store.search(questions, 3, "bm25")),
                                    "hybrid": [len(hs) for hs in pool.search(questions, 3)]}}))
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=three_nodes["env"], capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    here = three_nodes["index_c"] / out["index"]
    assert [p["path"] for p in out["placement"]] == [str(here)] * 2 and (here / "READY").is_file()
    assert len({p["node_id"] for p in out["placement"]}) == 1 and out["placement"][0]["node_id"] != out["head"]
    assert any(p["unpacked"] for p in out["placement"])  # the first actor on C unpacked the shipped copy
    assert out["same"] and out["hybrid"] == [3] * 20


def test_placement_spreads_or_packs_generator_replicas(three_nodes, tmp_path):
    """ray.placement over three nodes: spread puts three replicas on three nodes, pack on one; a replacement
    starts in its predecessor's bundle, on the same node; a group the cluster cannot hold is one clear error."""
    script = textwrap.dedent(f"""
        import json, ray
        from raylign.config import load_config
        from raylign.models import resolve_model
        from raylign.orchestrator.generator_pool import GeneratorPool
        from raylign.orchestrator.placement import PlacementError, reserve
        ray.init(address="{three_nodes['address']}")
        out = {{}}
        for placement in ("spread", "pack"):
            cfg = load_config(None, ["model.name=tiny-random-llama", "generator.backend=hf", "generator.num_replicas=3",
                                     "generator.num_cpus=0.5", "generator.max_new_tokens=4", f"ray.placement={{placement}}"],
                              environ={{}})
            pool = GeneratorPool(resolve_model(cfg.model), cfg.model, cfg.generator, cfg.fault, placement=placement)
            out[placement] = pool.node_ids()
            if placement == "pack":
                ray.kill(pool.actors[1])
                pool._replace(1, "killed by the test")
                out["replaced"] = pool.node_ids()
            pool.shutdown()
        try:
            reserve([{{"CPU": 64}}], "pack", "generator replica", timeout_s=5)
        except PlacementError as e:
            out["error"] = str(e)
        print("RESULT", json.dumps(out))
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=three_nodes["env"], capture_output=True,
                          text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert len(set(out["spread"])) == 3
    assert len(set(out["pack"])) == 1 and out["replaced"] == out["pack"]
    assert out["error"] == ("ray.placement=pack: the cluster could not place 1 generator replica bundle(s) of "
                            "{'CPU': 64} within 5 s; it lacks those resources (ray status shows what each node has)")
