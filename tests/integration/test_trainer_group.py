"""TrainerGroup on a local Ray cluster: 2 Ray Train workers (FSDP2 and DDP, gloo) on tiny-random-llama.

One FSDP2 group serves most tests (a start costs 20-30 s); tests run in file order and the first one
needs the group's initial weights. The micro-batch budget is small so batches split into several
micro-batches per rank and the shorter rank runs dummy forwards.
"""

import json
import math
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from raylign.actors.trainer_math import lr_multiplier
from raylign.config import ModelConfig, TrainerConfig
from raylign.models import load_hf_model
from raylign.orchestrator import trainer_group
from raylign.orchestrator.trainer_group import TrainerCommandError, TrainerGroup, TrainerGroupError
from raylign.types import TrainBatch

# bf16 forward in the workers (FSDP2 bf16 params) vs an in-process bf16 HF forward, both rounding the
# same weights: differences come from padding/kernel order only; measured max ~1e-2 on |logp| ~ 11.
BF16_ATOL = 0.05
TOTAL_STEPS = 40
CFG = dict(num_workers=2, lr=5e-3, warmup_steps=2, lr_schedule="linear", micro_batch_tokens=64)
KEYS = {"loss/policy", "loss/kl", "loss/total", "kl/mean", "clip/fraction", "ratio/mean", "train/grad_norm",
        "train/lr", "train/entropy", "train/tokens", "train/optimizer_steps"}


def make_batch(n=5, seed=0) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    prompts, completions, masks = [], [], []
    for i in range(n):
        p, c = 3 + 4 * i, 2 + 3 * ((i * 7) % 5)
        prompts.append(torch.randint(10, 2000, (p,), generator=gen).tolist())
        completions.append(torch.randint(10, 2000, (c,), generator=gen).tolist())
        masks.append([0 if t == 1 else 1 for t in range(c)])  # one masked-out token (tool output)
    return TrainBatch(prompts, completions, masks)


def hf_logprobs(model, batch: TrainBatch) -> list[list[float]]:
    out = []
    with torch.no_grad():
        for p, c in zip(batch.prompt_ids, batch.completion_ids):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1).tolist())
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def pg_batch(group, batch: TrainBatch, advantages: list[float]) -> TrainBatch:
    old = group.logprobs(batch)
    return TrainBatch(batch.prompt_ids, batch.completion_ids, batch.loss_mask,
                      fields={"advantages_B": advantages, "old_logprobs_B_T": old})


def fp32_weights(group, folder) -> dict[str, torch.Tensor]:
    group.save_checkpoint(str(folder))
    return load_file(str(folder / "trainer_model.safetensors"))


@pytest.fixture(scope="module")
def group(ray_session, tiny_model, tmp_path_factory):
    started = time.monotonic()
    g = TrainerGroup(tiny_model, ModelConfig(name=tiny_model), TrainerConfig(backend="fsdp2", **CFG), seed=0,
                     storage_dir=str(tmp_path_factory.mktemp("ray_train")), total_steps=TOTAL_STEPS, reference=True)
    print(f"\nfsdp2 group start: {time.monotonic() - started:.1f}s")
    yield g
    g.shutdown()
    assert not g._thread.is_alive() and g._fit_error is None


@pytest.fixture(scope="module")
def hf_bf16(tiny_model):
    return load_hf_model(tiny_model, "bfloat16").eval()


def test_logprobs_match_an_hf_forward_in_batch_order(group, hf_bf16):
    batch = make_batch()
    started = time.monotonic()
    policy = group.logprobs(batch)
    print(f"logprobs round trip: {time.monotonic() - started:.2f}s")
    expected = hf_logprobs(hf_bf16, batch)
    assert [len(x) for x in policy] == [len(c) for c in batch.completion_ids]
    assert max_diff(policy, expected) < BF16_ATOL
    assert max_diff(group.logprobs(batch, which="ref"), expected) < BF16_ATOL
    # A reordered batch comes back reordered (batch order, not rank order). Other neighbours mean other
    # padding, so bf16 results move by ~1e-2; a swapped sequence would be off by ~1.
    order = [3, 0, 4, 2, 1]
    assert max_diff(group.logprobs(batch.select(order)), [policy[i] for i in order]) < BF16_ATOL


def test_samples_of_one_prompt_share_a_packed_row_and_keep_their_log_probs(group, hf_bf16):
    assert group.packed_row_tokens == 1024
    base = make_batch(3, seed=3)
    batch = TrainBatch([p for p in base.prompt_ids for _ in range(3)],
                       [c[:k] for c in base.completion_ids for k in (len(c), 2, 1)],
                       [m[:k] for m in base.loss_mask for k in (len(m), 2, 1)])
    assert max_diff(group.logprobs(batch), hf_logprobs(hf_bf16, batch)) < BF16_ATOL


def test_train_step_raises_logprobs_of_positive_advantages(group, tmp_path):
    batch = make_batch(seed=1)
    advantages = [1.0, -1.0, 1.0, 0.0, -1.0]
    before = group.logprobs(batch)
    group.save_weights(str(tmp_path / "before.safetensors"))
    started = time.monotonic()
    metrics = group.train_step(pg_batch(group, batch, advantages), "policy_gradient", {"agg": "token"})
    print(f"train_step (tiny, 5 seqs): {time.monotonic() - started:.2f}s")
    group.save_weights(str(tmp_path / "after.safetensors"))
    after = group.logprobs(batch)

    w0, w1 = load_file(str(tmp_path / "before.safetensors")), load_file(str(tmp_path / "after.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    for i, adv in enumerate(advantages):
        change = sum(after[i]) / len(after[i]) - sum(before[i]) / len(before[i])
        if adv > 0:
            assert change > 0, (i, change)
        elif adv < 0:
            assert change < 0, (i, change)
    assert set(metrics) == KEYS and all(math.isfinite(v) for v in metrics.values())
    assert metrics["train/grad_norm"] > 0
    assert metrics["train/tokens"] == sum(map(sum, batch.loss_mask))
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-3)  # on-policy: old logprobs from the same model
    step = metrics["train/optimizer_steps"] - 1
    assert metrics["train/lr"] == pytest.approx(5e-3 * lr_multiplier(int(step), "linear", 2, TOTAL_STEPS))

    more = group.train_step(pg_batch(group, batch, advantages), "policy_gradient", {}, minibatches=2)
    assert more["train/optimizer_steps"] == metrics["train/optimizer_steps"] + 2


def test_save_weights_is_an_hf_bf16_file_that_reproduces_the_group(group, tiny_model, tmp_path):
    path = tmp_path / "weights.safetensors"
    seconds = group.save_weights(str(path))
    assert seconds > 0 and not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    with safe_open(f"{tiny_model}/model.safetensors", "pt") as f:
        hf_names = set(f.keys())
    assert "lm_head.weight" not in names  # tied: the generators re-tie it to the embedding
    assert names == hf_names - {"lm_head.weight"}

    model = load_hf_model(tiny_model, "bfloat16").eval()
    result = model.load_state_dict(load_file(str(path)), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied, so loaded too
    batch = make_batch(seed=2)
    assert max_diff(group.logprobs(batch), hf_logprobs(model, batch)) < BF16_ATOL


def test_checkpoint_resume_is_bit_identical(group, tmp_path):
    batch = make_batch(seed=3)

    def two_steps():
        out = []
        for advantages in ([1.0, -1.0, 0.5, 0.0, -0.5], [-1.0, 1.0, 0.0, 1.0, 0.5]):
            out.append(group.train_step(pg_batch(group, batch, advantages), "policy_gradient", {}))
        return out

    group.save_checkpoint(str(tmp_path / "S"))
    metrics1 = two_steps()
    w1 = fp32_weights(group, tmp_path / "A")
    group.load_checkpoint(str(tmp_path / "S"))
    metrics2 = two_steps()
    w2 = fp32_weights(group, tmp_path / "B")

    assert metrics1 == metrics2  # same LR (scheduler restored), same grad norms, same losses
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    saved = load_file(str(tmp_path / "S" / "trainer_model.safetensors"))
    assert any(not torch.equal(w1[k], saved[k]) for k in saved)  # the two steps did move the weights
    state = json.loads((tmp_path / "S" / "trainer_state.json").read_text())
    assert len(state["rng"]) == 2 and state["rng"][0]["torch"] != state["rng"][1]["torch"]
    assert {p.name for p in (tmp_path / "S").iterdir()} == {"trainer_model.safetensors", "trainer_state.json",
                                                             "trainer_optimizer.safetensors", "trainer_optimizer.json"}


def test_a_broken_checkpoint_file_fails_every_rank_and_changes_nothing(group, tmp_path):
    group.save_checkpoint(str(tmp_path / "S"))
    optim = tmp_path / "S" / "trainer_optimizer.safetensors"
    optim.write_bytes(optim.read_bytes()[:-1])  # rank 0 finds it before any rank enters a broadcast
    with pytest.raises(TrainerCommandError, match=r"rank\(s\) 0, 1") as err:
        group.load_checkpoint(str(tmp_path / "S"))
    assert f"trainer checkpoint file {optim} is not a readable safetensors file" in str(err.value)
    before = load_file(str(tmp_path / "S" / "trainer_model.safetensors"))
    assert all(torch.equal(before[k], v) for k, v in fp32_weights(group, tmp_path / "A").items())


def test_a_file_that_fails_its_hash_on_rank_0_fails_every_rank(group, tmp_path):
    """What a remote checkpoint's large files get: rank 0 hashes its copy against the manifest's digests."""
    files = group.save_checkpoint(str(tmp_path / "S"))
    digests = {name: entry["sha256"] for name, entry in files.items()}
    group.load_checkpoint(str(tmp_path / "S"), digests)  # the right digests load
    digests["trainer_optimizer.safetensors"] = "0" * 64
    with pytest.raises(TrainerCommandError, match=r"rank\(s\) 0, 1") as err:
        group.load_checkpoint(str(tmp_path / "S"), digests)
    assert "trainer_optimizer.safetensors does not match its sha256 in the manifest" in str(err.value)


def test_export_hf_loads_in_transformers(group, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    group.export_hf(str(out))
    group.save_weights(str(tmp_path / "w.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "raylign_model.json").exists()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tok.chat_template and "hi" in text and len(text) > len("hi") + 10
    synced = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(p, synced[n]) for n, p in model.state_dict().items() if n != "lm_head.weight")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied again on load


def test_kl_to_the_reference_through_the_ref_logprobs_field(group):
    batch = make_batch(seed=5)
    ref = group.logprobs(batch, which="ref")
    assert max_diff(ref, group.logprobs(batch)) > 1e-3  # earlier tests moved the policy off the reference
    fields = pg_batch(group, batch, [0.0] * 5).fields
    kl_batch = TrainBatch(batch.prompt_ids, batch.completion_ids, batch.loss_mask,
                          fields={**fields, "ref_logprobs_B_T": ref})
    metrics = group.train_step(kl_batch, "policy_gradient", {"kl_beta": 0.5})
    assert metrics["kl/mean"] > 0 and metrics["loss/kl"] == pytest.approx(0.5 * metrics["kl/mean"], rel=1e-4)
    assert metrics["loss/policy"] == pytest.approx(0.0, abs=1e-7)  # zero advantages: only the KL term pulls


def test_failed_command_raises_with_worker_traceback_and_group_keeps_serving(group):
    batch = make_batch()
    with pytest.raises(TrainerCommandError, match=r"(?s)rank\(s\) 0, 1.*unknown loss_name 'nope'.*Traceback"):
        group.train_step(pg_batch(group, batch, [1.0] * 5), "nope", {})
    # Rank 1 has no sequence here and would wait in a reduce-scatter if only rank 0 found the missing field.
    missing = r"loss 'policy_gradient': missing batch fields \['advantages_B', 'old_logprobs_B_T'\]"
    with pytest.raises(TrainerCommandError, match=missing):
        group.train_step(TrainBatch([[1, 2]], [[3]], [[1]]), "policy_gradient", {})
    with pytest.raises(TrainerCommandError, match="empty prompt"):
        group.logprobs(TrainBatch([[]], [[1]], [[1]]))
    assert [len(x) for x in group.logprobs(batch)] == [len(c) for c in batch.completion_ids]


def test_ddp_group_trains_resumes_exactly_and_loads_an_fsdp2_checkpoint(group, tiny_model, tmp_path):
    started = time.monotonic()
    cfg = TrainerConfig(backend="ddp", **CFG)
    with TrainerGroup(tiny_model, ModelConfig(name=tiny_model), cfg, seed=0, storage_dir=str(tmp_path / "rt"),
                      total_steps=TOTAL_STEPS, shared_dir=str(tmp_path / "out")) as ddp:
        print(f"\nddp group start: {time.monotonic() - started:.1f}s")
        assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())  # probe read and removed
        batch = make_batch(seed=4)
        # fp32 weights under bf16 autocast: close to, not equal to, a bf16-weight forward
        assert max_diff(ddp.logprobs(batch), hf_logprobs(load_hf_model(tiny_model, "float32"), batch)) < BF16_ATOL
        w0 = fp32_weights(ddp, tmp_path / "S")
        metrics = ddp.train_step(pg_batch(ddp, batch, [1.0, -1.0, 1.0, 0.0, -1.0]), "policy_gradient", {})
        w1 = fp32_weights(ddp, tmp_path / "A")
        assert set(metrics) == KEYS and all(math.isfinite(v) for v in metrics.values())
        assert metrics["train/grad_norm"] > 0 and metrics["train/optimizer_steps"] == 1
        assert any(not torch.equal(w0[k], w1[k]) for k in w0)
        ddp.load_checkpoint(str(tmp_path / "S"))
        assert ddp.train_step(pg_batch(ddp, batch, [1.0, -1.0, 1.0, 0.0, -1.0]), "policy_gradient", {}) == metrics
        assert all(torch.equal(w1[k], v) for k, v in fp32_weights(ddp, tmp_path / "B").items())

        # a full checkpoint loads into a fresh group of another backend: weights, step count, LR schedule
        fsdp2_weights = fp32_weights(group, tmp_path / "F")
        steps = json.loads((tmp_path / "F" / "trainer_state.json").read_text())["steps"]
        ddp.load_checkpoint(str(tmp_path / "F"))
        assert all(torch.equal(fsdp2_weights[k], v) for k, v in fp32_weights(ddp, tmp_path / "C").items())
        after = ddp.train_step(pg_batch(ddp, batch, [1.0, -1.0, 1.0, 0.0, -1.0]), "policy_gradient", {})
        assert after["train/optimizer_steps"] == steps + 1
        assert after["train/lr"] == pytest.approx(5e-3 * lr_multiplier(steps, "linear", 2, TOTAL_STEPS))
    assert not ddp._thread.is_alive() and ddp._fit_error is None


def test_a_rank_that_cannot_read_the_drivers_output_dir_stops_the_start(ray_session, tiny_model, tmp_path,
                                                                         monkeypatch):
    # what a second machine without shared storage sees: the driver's probe file is not there
    monkeypatch.setattr(trainer_group, "write_probe", lambda folder: (str(tmp_path / "not-on-this-node"), "x"))
    with pytest.raises(TrainerGroupError, match=r"output_dir .*/out: trainer rank 0 \(node \w+\) cannot read the "
                                                r"files the driver writes there.*NFS"):
        TrainerGroup(tiny_model, ModelConfig(name=tiny_model), TrainerConfig(backend="fsdp2", **{**CFG, "num_workers": 1}),
                     seed=0, storage_dir=str(tmp_path / "rt"), total_steps=TOTAL_STEPS, shared_dir=str(tmp_path / "out"))
