"""Trainer helpers in-process: padding, log-probs against a hand loop over an HF forward, work plans, LR."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raylign.actors.trainer_math import (
    check_batch,
    loss_units,
    lr_multiplier,
    merge_step_metrics,
    micro_batches,
    pack_rows,
    packing_row_tokens,
    pad_batch,
    sequence_logprobs,
    work_plan,
)
from raylign.types import TrainBatch

PAD = 0


def _batch() -> TrainBatch:
    return TrainBatch(
        prompt_ids=[[5, 6, 7], [8], [9, 10]],
        completion_ids=[[11, 12], [13, 14, 15, 16], []],
        loss_mask=[[1, 1], [1, 0, 1, 1], []],
        fields={"advantages_B": [1.0, -0.5, 0.0], "old_logprobs_B_T": [[-1.0, -2.0], [-3.0, -4.0, -5.0, -6.0], []]},
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _group_batch() -> TrainBatch:
    """Two prompts, the first with three samples (one empty), the second with one."""
    return TrainBatch(
        prompt_ids=[[5, 6], [5, 6], [9], [5, 6]],
        completion_ids=[[11, 12], [13], [14, 15], []],
        loss_mask=[[1, 1], [0], [1, 1], []],
        fields={"advantages_B": [1.0, 2.0, 3.0, 4.0]},
    )


def test_pad_batch_layout_masks_and_fields():
    t = pad_batch(_batch(), PAD, max_row_tokens=1024)  # distinct prompts: one sequence per row either way
    assert t["input_ids_R_L"].tolist() == [[5, 6, 7, 11, 12], [8, 13, 14, 15, 16], [9, 10, 0, 0, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert t["position_ids_R_L"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 0, 0, 0]]
    assert t["row_B"].tolist() == [0, 1, 2]
    assert t["target_ids_B_T"].tolist() == [[11, 12, 0, 0], [13, 14, 15, 16], [0, 0, 0, 0]]
    # completion token t of row i is predicted by the logits at P_i + t - 1
    assert t["logit_pos_B_T"].tolist() == [[2, 3, 0, 0], [0, 1, 2, 3], [0, 0, 0, 0]]
    assert t["valid_B_T"].tolist() == [[True, True, False, False], [True] * 4, [False] * 4]
    assert t["mask_B_T"].tolist() == [[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]]
    assert t["advantages_B"].tolist() == [1.0, -0.5, 0.0]
    assert t["old_logprobs_B_T"].tolist() == [[-1, -2, 0, 0], [-3, -4, -5, -6], [0, 0, 0, 0]]


def test_pack_rows_share_a_prompt_until_the_row_cap():
    batch = _group_batch()
    assert pack_rows(batch, 0) == [[0], [1], [2], [3]]
    assert pack_rows(batch, 1024) == [[0, 1, 3], [2]]
    assert pack_rows(batch, 4) == [[0], [1, 3], [2]]  # 2 + 2 + 1 > 4: sequence 1 opens a second row


def test_packing_only_where_the_4d_mask_reaches_attention_as_built():
    sdpa = LlamaConfig()
    sdpa._attn_implementation = "sdpa"
    eager = LlamaConfig()
    eager._attn_implementation = "eager"
    windowed = LlamaConfig()
    windowed._attn_implementation, windowed.sliding_window = "sdpa", 4096
    assert packing_row_tokens(sdpa, 1024) == 1024
    assert packing_row_tokens(eager, 1024) == 0 and packing_row_tokens(windowed, 1024) == 0


def test_packed_layout_positions_restart_and_completions_see_only_the_prompt():
    t = pad_batch(_group_batch(), PAD, max_row_tokens=1024)
    # row 0: prompt 5 6, then 11 12 (seq 0), 13 (seq 1); seq 3 is empty. row 1: prompt 9, then 14 15 (seq 2)
    assert t["input_ids_R_L"].tolist() == [[5, 6, 11, 12, 13], [9, 14, 15, 0, 0]]
    assert t["position_ids_R_L"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 0]]
    assert t["row_B"].tolist() == [0, 0, 1, 0]
    # the first token of every completion is predicted by its prompt's last position
    assert t["logit_pos_B_T"].tolist() == [[1, 2], [1, 0], [0, 1], [0, 0]]
    assert t["target_ids_B_T"].tolist() == [[11, 12], [13, 0], [14, 15], [0, 0]]
    assert t["mask_B_T"].tolist() == [[1, 1], [0, 0], [1, 1], [0, 0]]
    mask = t["attention_mask"]
    assert mask.shape == (2, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # token 13 sees the prompt and itself, not the other sample's 11 12
    ]
    assert mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],  # padding sees the prompt and itself: no all-masked query row
        [1, 0, 0, 0, 1],
    ]


def test_packed_rows_give_the_log_probs_and_gradients_of_separate_sequences(model):
    batch = _group_batch()
    grads = []
    for row_tokens in (0, 1024):
        logprobs_B_T, entropy_B_T = sequence_logprobs(model, pad_batch(batch, PAD, row_tokens), with_entropy=True)
        (logprobs_B_T * torch.tensor([[1.0, -2.0], [3.0, 0.0], [0.5, 1.5], [0.0, 0.0]])).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad()
        with torch.no_grad():
            for i, (p, c) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
                for t, token in enumerate(c):
                    logits_V = model(input_ids=torch.tensor([p + c[:t]])).logits[0, -1].float()
                    assert logprobs_B_T[i, t].item() == pytest.approx(torch.log_softmax(logits_V, -1)[token].item(),
                                                                      abs=1e-5)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_check_batch_rejects_empty_prompt_and_misaligned_mask():
    with pytest.raises(ValueError, match="empty prompt"):
        check_batch(TrainBatch([[]], [[1]], [[1]]))
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2"):
        check_batch(TrainBatch([[1]], [[1, 2]], [[1]]))
    with pytest.raises(ValueError, match="field 'advantages_B'"):
        check_batch(TrainBatch([[1]], [[2]], [[1]], fields={"advantages_B": [1.0, 2.0]}))


def test_sequence_logprobs_equal_a_hand_loop_over_hf_forward(model):
    batch = _batch()
    with torch.no_grad():
        logprobs_B_T, entropy_B_T = sequence_logprobs(model, pad_batch(batch, PAD), with_entropy=True)
        for i, (p, c) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
            for t, token in enumerate(c):
                logits_V = model(input_ids=torch.tensor([p + c[:t]])).logits[0, -1].float()
                expected = torch.log_softmax(logits_V, -1)[token]
                entropy = -(torch.softmax(logits_V, -1) * torch.log_softmax(logits_V, -1)).sum()
                assert logprobs_B_T[i, t].item() == pytest.approx(expected.item(), abs=1e-5)
                assert entropy_B_T[i, t].item() == pytest.approx(entropy.item(), abs=1e-5)
    assert logprobs_B_T[0, 2:].tolist() == [0.0, 0.0] and logprobs_B_T[2].tolist() == [0.0] * 4


def test_entropy_is_a_metric_unless_it_is_a_loss_term(model):
    tensors = pad_batch(_batch(), PAD)
    logprobs_B_T, metric_B_T = sequence_logprobs(model, tensors, with_entropy=True)
    assert logprobs_B_T.requires_grad and not metric_B_T.requires_grad
    _, bonus_B_T = sequence_logprobs(model, tensors, entropy_grad=True)
    assert bonus_B_T.requires_grad
    assert torch.allclose(bonus_B_T.detach(), metric_B_T)


def test_sequence_logprobs_carry_gradient(model):
    logprobs_B_T, entropy_B_T = sequence_logprobs(model, pad_batch(_batch(), PAD))
    logprobs_B_T.sum().backward()
    assert entropy_B_T is None
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_micro_batches_respect_the_padded_token_budget():
    lengths = [3, 5, 2, 8, 1, 1, 20, 4]
    batch = TrainBatch([[1] * n for n in lengths], [[]] * len(lengths), [[]] * len(lengths))
    groups = micro_batches(batch, token_budget=10)
    # by length: 4(1) 5(1) | 2(2) 0(3) | 7(4) 1(5) | 3(8) | 6(20, alone over budget); rows x longest <= 10.
    # Five forwards either way; this cut pads 46 tokens, filling greedily (1 1 2 | 3 4 | 5 | ...) pads 47.
    assert groups == [[4, 5], [0, 2], [1, 7], [3], [6]]  # indices ascending within a group
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each sequence exactly once
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 10 or len(g) == 1
    assert micro_batches(batch, token_budget=1000) == [[0, 1, 2, 3, 4, 5, 6, 7]]


def test_micro_batches_cut_where_padding_costs_more_than_a_forward():
    lengths = [10, 100, 10, 10]
    batch = TrainBatch([[1] * n for n in lengths], [[]] * 4, [[]] * 4)
    # one group fits the budget (4 x 100 = 400) but pads 270 tokens, more than one extra forward costs
    assert micro_batches(batch, token_budget=400) == [[0, 2, 3], [1]]
    same = TrainBatch([[1] * 50] * 4, [[]] * 4, [[]] * 4)
    assert micro_batches(same, token_budget=400) == [[0, 1, 2, 3]]  # no padding: one forward


def test_micro_batches_plan_packed_rows():
    # 3 prompts x 2 samples; packed rows are 10 + 5 + 5 = 20 tokens (prompt once) instead of 2 x 15
    batch = TrainBatch([[1] * 10] * 2 + [[2] * 10] * 2 + [[3] * 10] * 2, [[7] * 5] * 6, [[1] * 5] * 6)
    assert micro_batches(batch, token_budget=40, max_row_tokens=1024) == [[0, 1, 2, 3], [4, 5]]
    assert micro_batches(batch, token_budget=40, max_row_tokens=0) == [[0, 1], [2, 3], [4, 5]]


def test_work_plan_splits_minibatches_then_shards_each_over_the_ranks():
    batch = TrainBatch([[1]] * 7, [[2]] * 7, [[1]] * 7)
    plan = work_plan(batch, world=2, minibatches=2, token_budget=4)
    # minibatch 0 = sequences 0-3, minibatch 1 = 4-6; each cut into one contiguous block per rank
    assert plan[0] == [[[0, 1]], [[4, 5]]]
    assert plan[1] == [[[2, 3]], [[6]]]
    # budget 3: two separate 2-token sequences (2 x 2 = 4) need two forwards; packed, rank 0's minibatch
    # [0, 1] is one row (prompt 1, completions 2, 2) of 3 tokens and needs one
    assert work_plan(batch, world=2, minibatches=2, token_budget=3)[0] == [[[0], [1]], [[4], [5]]]
    assert work_plan(batch, world=2, minibatches=2, token_budget=3, max_row_tokens=8)[0] == [[[0, 1]], [[4, 5]]]
    # two groups, two ranks, two minibatches: each minibatch keeps its group whole on one rank, so both
    # optimizer steps have work (cutting per rank first would leave each rank one empty minibatch)
    grouped = TrainBatch([[1]] * 8, [[2]] * 8, [[1]] * 8, group_B=[0] * 4 + [1] * 4)
    assert work_plan(grouped, world=2, minibatches=2, token_budget=64) == [[[[0, 1, 2, 3]], [[4, 5, 6, 7]]],
                                                                           [[], []]]
    tiny = work_plan(TrainBatch([[1]], [[2]], [[1]]), world=2, minibatches=1, token_budget=64)
    assert tiny == [[[[0]]], [[]]]  # rank 1 has nothing and will run dummy forwards


def test_loss_units_per_aggregation():
    batch = _batch()
    assert loss_units(batch, [0, 1, 2], "token") == 5.0
    assert loss_units(batch, [0, 1, 2], "sequence") == 2.0  # the empty completion does not count
    assert loss_units(batch, [0, 1, 2], "fixed") == 3.0
    with pytest.raises(ValueError, match="unknown agg"):
        loss_units(batch, [0], "median")


def test_lr_multiplier_warmup_then_decay():
    assert [lr_multiplier(s, "constant", 3, None) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(2, "cosine", 2, 12) == 1.0
    assert lr_multiplier(7, "cosine", 2, 12) == pytest.approx(0.5)
    assert lr_multiplier(12, "cosine", 2, 12) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(7, "linear", 2, 12) == pytest.approx(0.5)
    assert lr_multiplier(50, "linear", 2, 12) == 0.0
    with pytest.raises(ValueError, match="needs total_steps"):
        lr_multiplier(5, "cosine", 0, None)
    assert math.isclose(lr_multiplier(0, "cosine", 0, 10), 1.0)


def test_merge_step_metrics_weights_by_units():
    rank0 = {"sums": {"loss/policy": 3 * 1.0}, "weight": 3.0, "entropy_sum": 6.0, "tokens": 3.0,
             "grad_norms": [2.0, 4.0], "lrs": [1e-3, 1e-3], "optimizer_steps": 7}
    rank1 = {"sums": {"loss/policy": 1 * 5.0}, "weight": 1.0, "entropy_sum": 2.0, "tokens": 1.0,
             "grad_norms": [2.0, 4.0], "lrs": [1e-3, 1e-3], "optimizer_steps": 7}
    m = merge_step_metrics([rank0, rank1])
    assert m["loss/policy"] == pytest.approx(2.0)  # (3*1 + 1*5) / 4
    assert m["train/entropy"] == pytest.approx(2.0) and m["train/tokens"] == 4.0
    assert m["train/grad_norm"] == 3.0 and m["train/lr"] == 1e-3 and m["train/optimizer_steps"] == 7.0


def test_masked_only_log_probs_are_the_full_ones_on_loss_tokens_and_zero_elsewhere(model):
    """SFT-shaped rows (a long prompt remainder with loss mask 0, a short response): the LM head runs on the
    response positions only, and the log-probs, entropies and gradients there match the full computation."""
    from raylign.algorithms.sft import supervised_batch

    batch = supervised_batch([([1, 2, 3, 4, 5, 6, 7, 8], [9, 10]), ([1, 2, 3, 11, 12, 13, 14], [15, 16, 17])])
    assert batch.prompt_ids == [[1, 2, 3], [1, 2, 3]]  # the shared prefix, computed once per packed row
    grads = []
    for masked_only in (False, True):
        tensors = pad_batch(batch, PAD, 1024)
        logprobs_B_T, entropy_B_T = sequence_logprobs(model, tensors, with_entropy=True, masked_only=masked_only)
        mask_B_T = tensors["mask_B_T"]
        if masked_only:
            assert logprobs_B_T[mask_B_T == 0].abs().sum() == 0 and entropy_B_T[mask_B_T == 0].abs().sum() == 0
            assert torch.allclose(logprobs_B_T, full_B_T * mask_B_T, atol=1e-6)
            assert torch.allclose(entropy_B_T, full_entropy_B_T * mask_B_T, atol=1e-6)
        else:
            full_B_T, full_entropy_B_T = logprobs_B_T.detach(), entropy_B_T
            assert (full_B_T[mask_B_T == 0] != 0).any()  # the full pass has values on the prompt remainder
        (logprobs_B_T * mask_B_T).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad()
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
