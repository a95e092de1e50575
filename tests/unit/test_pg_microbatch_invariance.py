"""Every policy-gradient loss gives the same gradient and the same merged metrics whether the trainer runs the
batch as 1 micro-batch, 4 micro-batches, or 2 ranks of 2, with packed rows, multi-turn masks (tool tokens
at 0), a length-1 response and a fully masked (overlong-filtered) one.

The split is the trainer's own (``work_plan``, ``pad_batch``, ``sequence_logprobs``, ``loss_units`` and the
registry's ``Loss.unit``) on a tiny Llama in-process; the weighting replays ``TrainerWorker.train_step``: each
micro-batch loss times world * units_mb / units_total, rank gradients averaged as DDP / FSDP do.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raylign.actors.trainer_math import loss_units, pad_batch, sequence_logprobs, work_plan
from raylign.algorithms.registry import LOSSES
from raylign.types import TrainBatch

PAD, ROW_TOKENS = 0, 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return LlamaForCausalLM(config).train()


def _batch(model) -> TrainBatch:
    """4 prompts x 3 samples; old and reference log-probs near the current ones, so some ratios clip."""
    g = torch.Generator().manual_seed(1)
    lengths = [[5, 1, 9], [7, 3, 4], [2, 8, 6], [1, 5, 3]]
    prompts, completions, masks, group = [], [], [], []
    for k, row in enumerate(lengths):
        for j, n in enumerate(row):
            prompts.append([3 + k, 10 + k, 20])
            completions.append(torch.randint(1, 64, (n,), generator=g).tolist())
            mask = [1] * n
            if (k, j) == (0, 2):
                mask[3:6] = [0, 0, 0]  # tool output spliced into a multi-turn episode
            if (k, j) == (1, 0):
                mask = [0] * n  # cut by the length limit (DAPO overlong filtering)
            masks.append(mask)
            group.append(k)
    batch = TrainBatch(prompts, completions, masks, group_B=group, temperature=0.9)
    with torch.no_grad():
        current, _ = sequence_logprobs(model, pad_batch(batch, PAD), temperature=0.9)
    noise_B_T = 0.15 * torch.randn(current.shape, generator=g)
    rows = [len(c) for c in completions]
    batch.fields = {
        "advantages_B": torch.randn(len(batch), generator=g).tolist(),
        "old_logprobs_B_T": [(current[i, :n] + noise_B_T[i, :n]).tolist() for i, n in enumerate(rows)],
        "ref_logprobs_B_T": [(current[i, :n] - noise_B_T[i, :n].abs()).tolist() for i, n in enumerate(rows)],
    }
    return batch


def _replayed_step(model, batch, loss_name, kwargs, world, budget, row_tokens):
    """(flat gradient, merged metrics, micro-batch count) of one optimizer step as the trainer computes it."""
    loss = LOSSES[loss_name]
    agg = loss.unit(kwargs)
    plan = work_plan(batch, world, 1, budget, row_tokens)
    step = [plan[r][0] for r in range(world)]
    total = sum(loss_units(batch, mb, agg) for rank in step for mb in rank)
    model.zero_grad()
    sums, weight = {}, 0.0
    for rank in step:
        for mb in rank:
            sub = batch.select(mb)
            tensors = pad_batch(sub, PAD, row_tokens)
            logprobs_B_T, _ = sequence_logprobs(model, tensors, temperature=sub.temperature, masked_only=True)
            value, metrics = loss.fn(logprobs_B_T=logprobs_B_T, mask_B_T=tensors["mask_B_T"],
                                     **{k: tensors[k] for k in sub.fields}, **kwargs)
            units = loss_units(batch, mb, agg)
            (value * (world * units / total) / world).backward()  # / world: DDP averages the ranks' gradients
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + units * v
            weight += units
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    return grad, {k: v / weight for k, v in sums.items()}, sum(len(rank) for rank in step)


PG = dict(clip_eps=0.1, clip_eps_high=0.15, kl_beta=0.05, kl_kind="k3")
CASES = [
    ("policy_gradient", {**PG, "agg": "token"}),
    ("policy_gradient", {**PG, "agg": "sequence"}),
    ("policy_gradient", {**PG, "agg": "fixed", "max_tokens": 12}),
    ("gspo", {"clip_eps": 0.03, "clip_eps_high": 0.04, "kl_beta": 0.05, "kl_kind": "k3"}),
    ("cispo", {**PG, "clip_eps": 1.0, "agg": "token"}),
    ("cispo", {**PG, "clip_eps": 1.0, "agg": "sequence"}),
]


@pytest.mark.parametrize("loss_name, kwargs", CASES, ids=[f"{n}-{k.get('agg', 'seq')}" for n, k in CASES])
def test_one_or_four_micro_batches_or_two_ranks_give_the_same_gradient(model, loss_name, kwargs):
    batch = _batch(model)
    whole, whole_metrics, n = _replayed_step(model, batch, loss_name, kwargs, 1, 100_000, ROW_TOKENS)
    assert n == 1 and whole.abs().sum() > 0
    assert 0.0 < whole_metrics["clip/fraction"] < 1.0  # the clip binds somewhere, not everywhere
    for world, budget, row_tokens, micro in [(1, 1, ROW_TOKENS, 4), (2, 1, ROW_TOKENS, 4), (1, 1, 0, 4)]:
        grad, metrics, n = _replayed_step(model, batch, loss_name, kwargs, world, budget, row_tokens)
        assert n == micro  # budget 1: each group (its packed rows) is its own micro-batch
        torch.testing.assert_close(grad, whole, rtol=1e-4, atol=1e-7)
        # the loss terms follow the loss's units; clip/fraction and ratio/mean are means over the loss's own
        # units only for token losses and GSPO (the clipped surrogate reports token means whatever its agg)
        same_units = kwargs.get("agg") == "token" or loss_name == "gspo"
        for key in ("loss/policy", "loss/kl", "clip/fraction", "ratio/mean")[:4 if same_units else 2]:
            assert metrics[key] == pytest.approx(whole_metrics[key], rel=1e-5, abs=1e-8), key


def test_a_masked_token_changes_nothing_and_gspo_averages_over_mask_tokens_only(model):
    """Tool tokens (mask 0) and a fully masked sequence carry no gradient into GSPO's sequence ratio: changing
    their old log-probs leaves the gradient unchanged, changing a mask token's moves it."""
    batch = _batch(model)
    kwargs = {"clip_eps": 0.03, "clip_eps_high": 0.04}
    base, _, _ = _replayed_step(model, batch, "gspo", kwargs, 1, 100_000, ROW_TOKENS)
    tool = batch.select(list(range(len(batch))))
    tool.fields["old_logprobs_B_T"][2][4] += 5.0  # a tool token of the multi-turn episode
    tool.fields["old_logprobs_B_T"][3] = [v + 5.0 for v in tool.fields["old_logprobs_B_T"][3]]  # masked sequence
    same, _, _ = _replayed_step(model, tool, "gspo", kwargs, 1, 100_000, ROW_TOKENS)
    torch.testing.assert_close(same, base)
    moved = batch.select(list(range(len(batch))))
    moved.fields["old_logprobs_B_T"][2][0] -= 0.5
    other, _, _ = _replayed_step(model, moved, "gspo", kwargs, 1, 100_000, ROW_TOKENS)
    assert not torch.allclose(other, base)
