"""The trainer's work plan keeps groups whole, and every loss aggregation gives the weights it promises once
run through the trainer's split into ranks and micro-batches (replayed here without Ray)."""

import pytest
import torch

from raylign.actors.trainer_math import batch_groups, check_batch, loss_units, micro_batches, work_plan
from raylign.algorithms.numerics import aggregate
from raylign.algorithms.protocol import completions_batch
from raylign.types import Completion, TrainBatch


def _batch(lengths, group_B=None, prompts=None):
    prompts = prompts or [[1, 2, 3]] * len(lengths)
    return TrainBatch(prompt_ids=prompts, completion_ids=[[7] * n for n in lengths],
                      loss_mask=[[1] * n for n in lengths], group_B=group_B)


def test_pairs_stay_on_one_rank_and_in_one_micro_batch():
    # 6 pairs of very different lengths and a budget that fits about one long sequence per micro-batch
    lengths = [5, 90, 80, 6, 7, 70, 60, 8, 9, 50, 40, 10]
    batch = _batch(lengths, group_B=[k // 2 for k in range(12)], prompts=[[1, 2, k // 2 + 3] for k in range(12)])
    for world in (1, 2, 3):
        for minibatches in (1, 2):
            plan = work_plan(batch, world, minibatches, token_budget=120, max_row_tokens=0)
            seen = sorted(i for rank in plan for step in rank for mb in step for i in mb)
            assert seen == list(range(12))
            for rank in plan:
                for step in rank:
                    for mb in step:
                        assert all((i ^ 1) in mb for i in mb), (world, minibatches, mb)


def test_grpo_groups_stay_whole_and_share_packed_rows():
    groups = [[Completion([1, 2], [5] * n, "", [0.0] * n, "stop") for n in lens] for lens in ([3, 40, 4, 50], [2, 2])]
    batch = completions_batch(groups, temperature=0.7)
    assert batch.group_B == [0, 0, 0, 0, 1, 1] and batch.temperature == 0.7
    assert batch_groups(batch) == [[0, 1, 2, 3], [4, 5]]
    for mb in micro_batches(batch, token_budget=32, max_row_tokens=64):
        assert set(mb) in ({0, 1, 2, 3}, {4, 5}, {0, 1, 2, 3, 4, 5})  # a group bigger than the budget stays whole
    plan = work_plan(batch, 2, 1, token_budget=4096, max_row_tokens=64)
    assert plan[0] == [[[0, 1, 2, 3]]] and plan[1] == [[[4, 5]]]


def test_check_batch_refuses_split_groups_and_bad_temperature():
    with pytest.raises(ValueError, match="consecutive"):
        check_batch(_batch([1, 1, 1], group_B=[0, 1, 0]))
    with pytest.raises(ValueError, match="temperature"):
        check_batch(TrainBatch([[1]], [[2]], [[1]], temperature=0.0))


def _replayed_token_weights(batch: TrainBatch, agg: str, world: int, budget: int, max_tokens: int | None):
    """d(step loss)/d(token loss) as the trainer computes the step: each rank's micro-batch losses scaled by
    world * units_mb / units_total, then the ranks' gradients averaged (DDP / FSDP)."""
    plan = work_plan(batch, world, 1, budget, 0)
    total = sum(loss_units(batch, mb, agg) for rank in plan for mb in rank[0])
    weights = {}
    for rank in plan:
        for mb in rank[0]:
            T = max(len(batch.completion_ids[i]) for i in mb)
            loss_B_T = torch.zeros((len(mb), T), dtype=torch.float64, requires_grad=True)
            mask_B_T = torch.tensor([[1.0] * len(batch.completion_ids[i]) + [0.0] * (T - len(batch.completion_ids[i]))
                                     for i in mb], dtype=torch.float64)
            scale = world * loss_units(batch, mb, agg) / total
            (aggregate(loss_B_T, mask_B_T, agg, max_tokens) * scale / world).backward()
            for row, i in enumerate(mb):
                weights[i] = loss_B_T.grad[row, :len(batch.completion_ids[i])].tolist()
    return weights


def test_dr_grpo_fixed_weights_every_token_the_same_through_micro_batching():
    lengths, M = [10, 200, 12, 190], 256
    batch = _batch(lengths)
    for world, budget in [(1, 4096), (2, 64), (1, 64)]:
        weights = _replayed_token_weights(batch, "fixed", world, budget, max_tokens=M)
        flat = [w * len(lengths) * M for i in range(4) for w in weights[i]]
        assert flat == pytest.approx([1.0] * sum(lengths)), (world, budget, min(flat), max(flat))
    with pytest.raises(ValueError, match="max_tokens"):  # the old default (the micro-batch's own T) is refused
        _replayed_token_weights(batch, "fixed", 2, 64, max_tokens=None)


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_token_and_sequence_weights_survive_micro_batching(agg):
    lengths = [10, 200, 12, 190]
    batch = _batch(lengths)
    for world, budget in [(1, 4096), (2, 64)]:
        weights = _replayed_token_weights(batch, agg, world, budget, max_tokens=None)
        for i, n in enumerate(lengths):
            expected = 1 / sum(lengths) if agg == "token" else 1 / (len(lengths) * n)
            assert weights[i] == pytest.approx([expected] * n)


class _Toy(torch.nn.Module):
    """Logits depend on the input token only: enough to check which distribution the log-probs are of."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 16)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = self.emb(input_ids) * 3.0
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()


def test_trainer_logprobs_are_of_the_sampling_temperature():
    from raylign.actors.trainer_math import pad_batch, sequence_logprobs

    batch = TrainBatch([[1, 2]], [[3, 4, 5]], [[1, 1, 1]], temperature=0.7)
    model = _Toy()
    got, _ = sequence_logprobs(model, pad_batch(batch, 0), temperature=batch.temperature)
    logits = model.emb(torch.tensor([2, 3, 4])) * 3.0  # the positions predicting 3, 4, 5
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor([[3], [4], [5]])).squeeze(-1)
    torch.testing.assert_close(got[0], want)
    plain, _ = sequence_logprobs(model, pad_batch(batch, 0))
    assert not torch.allclose(plain[0], want)  # temperature 1 is another distribution
