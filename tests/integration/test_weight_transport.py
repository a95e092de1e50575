"""Weight sync over Ray's object store (trainer.weight_transport=ray) on the real stack: 2 Ray Train workers
(FSDP2, gloo), a transformers replica (vLLM's streamed load runs in test_multinode.py), tiny-random-llama. The weights travel in several checksummed buckets; the
replica serves the trainer's log-probs afterwards; a corrupted bucket and a replica that silently serves old
weights are both caught and answered by replacing the replica."""

import pytest
import torch
from safetensors.torch import load_file

from raylign.algorithms.policy_gradient import policy_gradient_step
from raylign.algorithms.protocol import completions_batch
from raylign.envs import make_env
from raylign.models import load_tokenizer
from raylign.orchestrator.rl_cluster import RayCluster
from tests.integration.helpers import tiny_config, vowel_reward


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_model, tmp_path_factory):
    # buckets of 0.05 MB of fp32: tiny-random-llama's 6.4 MB of bf16 weights travel in dozens
    cfg = tiny_config(tiny_model, tmp_path_factory.mktemp("wt"), "trainer.weight_transport=ray",
                      "trainer.sync_bucket_mb=0.05", "trainer.sync_check_every=1", "trainer.lr=1e-2",
                      "generator.backend=hf",  # vLLM's streamed load is covered cross-node in test_multinode.py
                      "trainer.sync_check_tol=0.15")  # the HF backend runs the trainer's kernels: tighter than the default
    rc = RayCluster(cfg, tiny_model, load_tokenizer(tiny_model), run_id="wtest",
                    storage_dir=str(tmp_path_factory.mktemp("ray_train")), reward_fn=vowel_reward)
    yield cfg, rc
    rc.shutdown()


def _step(rc, cfg, step):
    problems = make_env(cfg.env, cfg.dataset).problems("train")[:2]
    rc.reseed(step)
    return policy_gradient_step(rc, problems, cfg.algorithm, {})


def _max_gap(rc, cfg) -> float:
    groups = rc.generate(make_env(cfg.env, cfg.dataset).problems("test")[:2], n=2, temperature=1.0)
    trainer = rc.logprobs(completions_batch(groups))
    gen = [c.logprobs for g in groups for c in g]
    return max(abs(a - b) for g, t in zip(gen, trainer, strict=True) for a, b in zip(g, t, strict=True))


def test_ray_transport_moves_the_same_weights_in_checked_buckets(cluster, tmp_path):
    cfg, rc = cluster
    out = _step(rc, cfg, 0)
    assert out.metrics["sync/replicas_ray"] == 1 and out.metrics["sync/replicas_file"] == 0
    assert 0 <= out.metrics["sync/canary_gap"] <= cfg.trainer.sync_check_tol
    sync = rc.trainer.send_weights(cfg.trainer.sync_bucket_mb)
    rc.trainer.save_weights(str(tmp_path / "w.safetensors"))  # the file transport's bytes, for comparison
    from_file = load_file(str(tmp_path / "w.safetensors"))
    assert len(sync.buckets) >= 4 and all(b.nbytes <= 0.05 * 2**20 / 2 for b in sync.buckets if len(b.names) > 1)
    import ray

    sent = {k: v for b in sync.buckets for k, v in ray.get(b.ref).items()}
    assert sorted(sent) == sorted(from_file) and all(torch.equal(sent[k], from_file[k]) for k in sent)
    assert sync.nbytes == sum(t.numel() * t.element_size() for t in from_file.values()) == rc.trainer.last_sync_bytes
    assert rc.generators.policy_versions() == [rc.version] and _max_gap(rc, cfg) < 0.15


def test_a_corrupted_bucket_replaces_the_replica_and_the_sync_still_lands(cluster):
    cfg, rc = cluster
    before = rc.fault_counters()["fault/generator_restarts"]
    import ray

    ray.get(rc.generators.actors[0].inject_corrupt_sync.remote())
    out = _step(rc, cfg, 1)
    assert rc.fault_counters()["fault/generator_restarts"] == before + 1
    assert rc.generators.policy_versions() == [rc.version] and out.metrics["sync/canary_gap"] <= 0.15
    assert _max_gap(rc, cfg) < 0.15


def test_the_canary_catches_a_replica_serving_old_weights(cluster, tmp_path):
    """A sync that 'succeeds' but leaves the engine on old weights (the peers' silent failure): the replica
    reports the new version, and only the canary can tell."""
    import ray

    cfg, rc = cluster
    rc.trainer.save_weights(str(tmp_path / "old.safetensors"))
    for step in range(2, 4):
        _step(rc, cfg, step)
    ray.get(rc.generators.actors[0].load_weights.remote(str(tmp_path / "old.safetensors"), rc.version))
    stale = _max_gap(rc, cfg)
    assert stale > cfg.trainer.sync_check_tol, f"the policy moved too little for this test: {stale}"
    before = rc.fault_counters()["fault/generator_restarts"]
    gap = rc.check_sync()
    assert rc.fault_counters()["fault/generator_restarts"] == before + 1 and gap <= cfg.trainer.sync_check_tol
    assert _max_gap(rc, cfg) < 0.15


def test_the_sender_holds_one_bucket_not_the_whole_model(ray_session):
    """16 x 16 MB of fp32 parameters (128 MB as bf16) sent in 32 MB buckets: the sender's resident memory grows by
    at most the bf16 model (its pages in the object store) plus 2 buckets; gathering the whole model first, as the
    file transport does, would add its 256 MB fp32 copy on top."""
    import ray

    # glibc raises its mmap threshold after each large free and then keeps freed buckets resident (RssAnon grew 200
    # MB with 48 MB live): a fixed threshold returns each freed bucket, so RSS measures what the sender holds
    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"MALLOC_MMAP_THRESHOLD_": str(2**20)}})
    class Sender:
        def __init__(self):
            from torch import nn

            torch.manual_seed(0)
            self.model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(16)])
            self.model.config = type("Cfg", (), {"tie_word_embeddings": False})()

        def send(self, bucket_bytes):
            import threading
            import time

            from raylign.actors.weight_sync import send_weights
            from raylign.config import LoraConfig

            class Shards:  # the Trainable surface send_weights uses, on one rank (a gather is a copy)
                inner = self.model

                def gather_params(self, select):
                    return {n: p.detach().clone() for n, p in self.inner.named_parameters() if select(n)}

            def rss():
                with open("/proc/self/status") as f:
                    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

            base, peak, done = rss(), [0], threading.Event()

            def watch():
                while not done.is_set():
                    peak[0] = max(peak[0], rss())
                    time.sleep(0.002)

            watcher = threading.Thread(target=watch)
            watcher.start()
            sync = send_weights(Shards(), LoraConfig(), "unused", 0, bucket_bytes)
            done.set()
            watcher.join()
            return sync, max(peak[0], rss()) - base

        def weights(self):
            return {n: p.detach().to(torch.bfloat16) for n, p in self.model.named_parameters()}

    sender = Sender.remote()
    bucket = 32 * 2**20
    sync, grew = ray.get(sender.send.remote(bucket))
    model_bf16 = 16 * 2048 * 2048 * 2
    assert len(sync.buckets) == 8 and sync.nbytes == model_bf16
    assert grew <= model_bf16 + 2 * bucket, f"sender grew by {grew / 2**20:.0f} MB"
    from raylign.actors.weight_sync import read_buckets

    want = ray.get(sender.weights.remote())
    got = dict(read_buckets(sync, timeout_s=60))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    ray.kill(sender)
