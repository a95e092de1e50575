"""Plain-torch helpers of the trainer workers: packing, per-token log-probs, work plans, LR schedules.

No Ray and no torch.distributed here, so everything is unit-tested in-process (tests/unit/test_trainer_math.py).

Layout: sequences that share a prompt (the G samples of a group) are packed into one row, the prompt once
and then each completion: ``prompt + c_1 + c_2 + ...``, right-padded to L. A 4D mask lets each completion
see the prompt and its own earlier tokens only, and its positions restart after the prompt, so every token
gets exactly the logits of its own unpacked sequence, while the prompt's forward and backward are paid once
per row instead of once per sample (G=4, 43-token prompts, 66-token completions: 30% fewer tokens). Rows are
capped at ``max_row_tokens`` (attention in a row grows with its length squared); 0 packs one sequence per
row, the plain right-padded layout with a 2D padding mask. Completion token t of sequence i is predicted by
the logits at the position before it in its row (the prompt's last position for t = 0), so a prompt needs
>= 1 token.

Groups (``TrainBatch.group_B``: the G samples of one prompt, the two halves of a preference pair) are never
split: a group goes to one rank, one minibatch and one micro-batch, so a loss that compares a group's members
(DPO's chosen vs rejected) sees all of them. Rows are packed within a group only.

Work plan: every rank holds the whole batch, so every rank computes every rank's plan locally and the ranks
agree without talking. That matters because each FSDP2 forward all-gathers and each synced backward
reduce-scatters: all ranks must run the same number of forwards/backwards, so short ranks add dummy ones.
Loss scaling (deviation from a per-rank mean, on purpose): a micro-batch's loss is weighted by
``world * units_mb / units_minibatch`` with units counted over ALL ranks, so after DDP/FSDP average the
gradients the step equals one loss over the whole minibatch, independent of world size and micro-batching.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from raylign.types import TrainBatch

# What a loss's ``agg`` normalises by: tokens (DAPO), non-empty sequences (GRPO), sequences (Dr.GRPO).
LOSS_UNITS: dict[str, Callable[[list[int]], float]] = {
    "token": lambda mask: float(sum(mask)),
    "sequence": lambda mask: float(sum(mask) > 0),
    "fixed": lambda mask: 1.0,
}


def check_batch(batch: TrainBatch) -> None:
    """Raise ValueError on a batch no loss can use; runs on every rank before any collective."""
    n = len(batch)
    if n == 0:
        raise ValueError("empty TrainBatch")
    if len(batch.completion_ids) != n or len(batch.loss_mask) != n:
        raise ValueError("prompt_ids, completion_ids and loss_mask must have one entry per sequence")
    for i, (p, c, m) in enumerate(zip(batch.prompt_ids, batch.completion_ids, batch.loss_mask)):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt (the first completion token needs a context)")
        if len(m) != len(c):
            raise ValueError(f"sequence {i}: loss_mask has {len(m)} entries for {len(c)} completion tokens")
    for name, values in batch.fields.items():
        if len(values) != n:
            raise ValueError(f"field {name!r} has {len(values)} entries for {n} sequences")
    if batch.group_B is not None:
        if len(batch.group_B) != n:
            raise ValueError(f"group_B has {len(batch.group_B)} entries for {n} sequences")
        starts = [g for i, g in enumerate(batch.group_B) if i == 0 or g != batch.group_B[i - 1]]
        if len(starts) != len(set(starts)):
            raise ValueError("group_B: the sequences of a group must be consecutive")
    if not batch.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {batch.temperature}")


def batch_groups(batch: TrainBatch) -> list[list[int]]:
    """Sequence indices of each group, in batch order (each sequence alone when the batch has no groups)."""
    if batch.group_B is None:
        return [[i] for i in range(len(batch))]
    groups: list[list[int]] = []
    for i, g in enumerate(batch.group_B):
        if i == 0 or g != batch.group_B[i - 1]:
            groups.append([])
        groups[-1].append(i)
    return groups


def pack_rows(batch: TrainBatch, max_row_tokens: int) -> list[list[int]]:
    """Sequence indices of each packed row: sequences of one group with identical prompt ids, in batch order,
    share a row until the next completion would take it past ``max_row_tokens``; then that prompt opens a new row.

    Rows of one prompt hold ascending, consecutive runs of its sequences, so packing any subset made of whole
    rows, in ascending index order, gives back the same rows (micro_batches relies on it).
    """
    rows: list[list[int]] = []
    lengths: list[int] = []
    open_row: dict[tuple, int] = {}
    for i, (p, c) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
        key = (None if batch.group_B is None else batch.group_B[i], tuple(p))  # rows never cross groups
        r = open_row.get(key) if max_row_tokens > 0 else None
        if r is not None and lengths[r] + len(c) <= max_row_tokens:
            rows[r].append(i)
            lengths[r] += len(c)
        else:
            open_row[key] = len(rows)
            rows.append([i])
            lengths.append(len(p) + len(c))
    return rows


def packing_row_tokens(model_config, requested: int) -> int:
    """The row cap to use with this model: ``requested``, or 0 (no packing) when the model cannot take a
    custom 4D mask as it is: HF hands one to SDPA unchanged, but other kernels ignore or reject it, and a
    sliding window (Mistral, Gemma) would silently be dropped from it."""
    if getattr(model_config, "_attn_implementation", None) != "sdpa":
        return 0
    return requested if getattr(model_config, "sliding_window", None) is None else 0


def row_length(batch: TrainBatch, row: list[int]) -> int:
    return len(batch.prompt_ids[row[0]]) + sum(len(batch.completion_ids[i]) for i in row)


def pad_batch(batch: TrainBatch, pad_id: int, max_row_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Tensors for one forward in the packed layout (R rows of length L; see the module docstring), plus each
    field as ``_B`` (scalars) or ``_B_T`` (lists, 0-padded).

    Keys: input_ids_R_L, position_ids_R_L, attention_mask (a 0/1 padding mask (R, L) when every row holds one
    sequence, else a bool (R, 1, L, L), True where a query may attend a key), row_B (row of each sequence),
    target_ids_B_T (completion tokens), logit_pos_B_T (position in its row whose logits predict each target;
    0 on padding), valid_B_T (real completion token), mask_B_T (loss_mask), and one entry per ``batch.fields``.
    """
    rows = pack_rows(batch, max_row_tokens)
    B, R = len(batch), len(rows)
    L = max(row_length(batch, row) for row in rows)
    T = max(1, max(len(c) for c in batch.completion_ids))
    out = {
        "input_ids_R_L": torch.full((R, L), pad_id, dtype=torch.long),
        "position_ids_R_L": torch.zeros((R, L), dtype=torch.long),
        "row_B": torch.zeros(B, dtype=torch.long),
        "target_ids_B_T": torch.zeros((B, T), dtype=torch.long),
        "logit_pos_B_T": torch.zeros((B, T), dtype=torch.long),
        "valid_B_T": torch.zeros((B, T), dtype=torch.bool),
        "mask_B_T": torch.zeros((B, T), dtype=torch.float32),
    }
    segment_R_L = torch.full((R, L), -2, dtype=torch.long)  # -1 prompt, i completion of sequence i, -2 padding
    for r, row in enumerate(rows):
        prompt = batch.prompt_ids[row[0]]
        P = len(prompt)
        out["input_ids_R_L"][r, :P] = torch.tensor(prompt, dtype=torch.long)
        out["position_ids_R_L"][r, :P] = torch.arange(P)
        segment_R_L[r, :P] = -1
        start = P
        for i in row:
            c, m = batch.completion_ids[i], batch.loss_mask[i]
            C = len(c)
            out["row_B"][i] = r
            if C:
                out["input_ids_R_L"][r, start:start + C] = torch.tensor(c, dtype=torch.long)
                out["position_ids_R_L"][r, start:start + C] = torch.arange(P, P + C)
                segment_R_L[r, start:start + C] = i
                out["target_ids_B_T"][i, :C] = torch.tensor(c, dtype=torch.long)
                out["logit_pos_B_T"][i, 0] = P - 1
                out["logit_pos_B_T"][i, 1:C] = torch.arange(start, start + C - 1)
                out["valid_B_T"][i, :C] = True
                out["mask_B_T"][i, :C] = torch.tensor(m, dtype=torch.float32)
            start += C
    if R == B:
        out["attention_mask"] = (segment_R_L != -2).long()
    else:
        query, key = segment_R_L.unsqueeze(2), segment_R_L.unsqueeze(1)
        causal_L_L = torch.ones((L, L), dtype=torch.bool).tril()
        allowed = ((key == -1) | (key == query)) & (key != -2) & causal_L_L
        # a padding query sees itself too: no all-masked row, whose NaNs would reach the weight gradients
        out["attention_mask"] = (allowed | torch.eye(L, dtype=torch.bool)).unsqueeze(1)
    for name, values in batch.fields.items():
        if values and isinstance(values[0], (list, tuple)):
            field_B_T = torch.zeros((B, T), dtype=torch.float32)
            for i, row in enumerate(values):
                field_B_T[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
            out[name] = field_B_T
        else:
            out[name] = torch.tensor(values, dtype=torch.float32)
    return out


def model_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """Keyword arguments of the HF forward for a ``pad_batch`` layout."""
    return {"input_ids": tensors["input_ids_R_L"], "attention_mask": tensors["attention_mask"],
            "position_ids": tensors["position_ids_R_L"], "use_cache": False}


def sequence_logprobs(model: torch.nn.Module, tensors: dict[str, torch.Tensor], with_entropy: bool = False,
                      entropy_grad: bool = False, temperature: float = 1.0,
                      masked_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(completion token | everything before it) at the batch's sampling temperature (log_softmax of
    logits / temperature, the distribution the generator sampled from): (B, T), 0 on padding.

    The entropy (B, T) of the same distributions comes back too when asked: a metric (no grad), or with
    ``entropy_grad`` a differentiable term for an entropy bonus.

    ``masked_only``: values only where ``mask_B_T`` is non-zero (0 elsewhere), the tokens a loss trains on;
    the LM head and log-softmax then run over those positions alone. An SFT row is mostly prompt tokens
    (loss mask 0), whose (V = 49152)-wide logits were a third of the step.
    """
    L = tensors["input_ids_R_L"].shape[1]
    pos_B_T, valid_B_T = tensors["logit_pos_B_T"], tensors["valid_B_T"]
    if masked_only:
        valid_B_T = valid_B_T & (tensors["mask_B_T"] != 0)
    # Only positions some completion token needs: skip the prompt-only logits (R, P, V). Kept as a suffix
    # when that is (nearly) as small as the set itself, else as the set of positions.
    needed_K = torch.unique(pos_B_T[valid_B_T]) if valid_B_T.any() else torch.tensor([L - 1])
    first = int(needed_K[0])
    if not masked_only or len(needed_K) >= 0.9 * (L - first):
        keep, needed_K = L - first, torch.arange(first, L)
    else:
        keep = needed_K
    out = model(**model_inputs(tensors), logits_to_keep=keep)
    # One fp32 log-softmax over the kept positions serves the log-probs and the entropy; no (B, T, V) copy
    # is gathered first, only the (B, T) values each completion token needs.
    logits = out.logits.float()
    logp_R_K_V = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    index_B_T = torch.searchsorted(needed_K, pos_B_T).clamp(0, len(needed_K) - 1)
    rows_B_1 = tensors["row_B"].unsqueeze(1)
    logprobs_B_T = logp_R_K_V[rows_B_1, index_B_T, tensors["target_ids_B_T"]] * valid_B_T
    entropy_B_T = None
    if with_entropy or entropy_grad:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy_R_K = -torch.einsum("rkv,rkv->rk", logp_R_K_V.exp(), logp_R_K_V)
            entropy_B_T = entropy_R_K[rows_B_1, index_B_T] * valid_B_T
    return logprobs_B_T, entropy_B_T


def unpad(values_B_T: torch.Tensor, batch: TrainBatch, indices: list[int]) -> dict[int, list[float]]:
    """Row ``row`` of a (B, T) result belongs to sequence ``indices[row]`` of ``batch``: its values over that
    sequence's completion tokens, keyed by the sequence's index."""
    return {i: values_B_T[row, :len(batch.completion_ids[i])].float().cpu().tolist() for row, i in enumerate(indices)}


def token_values(values_R_L: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """V(s_t) for each completion token t from per-position critic outputs: the value read at the position
    whose logits predict token t (the state before t is emitted), as float32; 0 on padding."""
    picked_B_T = values_R_L[tensors["row_B"].unsqueeze(1), tensors["logit_pos_B_T"]]
    return picked_B_T.float() * tensors["valid_B_T"]


# What one extra forward/backward costs beyond its tokens (kernel launches, FSDP2 casts), in token-equivalents.
MICRO_BATCH_OVERHEAD_TOKENS = 128


def micro_batches(batch: TrainBatch, token_budget: int, max_row_tokens: int = 0) -> list[list[int]]:
    """Groups of sequence indices (ascending) whose packed rows fit token_budget (rows x longest row), at least
    padding; a group (``batch_groups``) is never split.

    The padded rectangle, not the token sum, is what a forward costs, so units (a group's rows, or one row when
    the batch has no groups) are sorted by their longest row and the sorted list is cut where rectangles plus
    a per-forward overhead are smallest (an exact DP over cut points). Filling each micro-batch up to the
    budget instead wasted ~40% on padding on a GRPO batch (lengths 41-180): 45 s vs 30 s per train step. A
    unit bigger than the budget forms its own micro-batch.
    """
    rows = pack_rows(batch, max_row_tokens)
    if batch.group_B is None:
        units = [[row] for row in rows]
    else:
        by_group: dict[int, list[list[int]]] = {}
        for row in rows:
            by_group.setdefault(batch.group_B[row[0]], []).append(row)
        units = list(by_group.values())
    longest = [max(row_length(batch, row) for row in unit) for unit in units]
    order = sorted(range(len(units)), key=lambda j: (longest[j], j))
    n = len(order)
    row_count = [0] * (n + 1)  # rows in the k shortest units
    for k, j in enumerate(order):
        row_count[k + 1] = row_count[k] + len(units[j])
    cost = [0.0] + [math.inf] * n  # cost[j]: cheapest split of the j shortest units
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = longest[order[j - 1]]
        for i in range(j - 1, -1, -1):
            count = row_count[j] - row_count[i]
            if j - i > 1 and count * width > token_budget:
                break
            c = cost[i] + count * width + MICRO_BATCH_OVERHEAD_TOKENS
            if c < cost[j]:
                cost[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(sorted(i for u in order[cut[j]:j] for row in units[u] for i in row))
        j = cut[j]
    return out[::-1]


def _split(indices: list, parts: int) -> list[list]:
    size, extra = divmod(len(indices), parts)
    bounds = [k * size + min(k, extra) for k in range(parts + 1)]
    return [indices[bounds[k]:bounds[k + 1]] for k in range(parts)]


def work_plan(batch: TrainBatch, world: int, minibatches: int, token_budget: int,
              max_row_tokens: int = 0) -> list[list[list[list[int]]]]:
    """plan[rank][minibatch] = micro-batches (lists of batch indices) of that rank in that optimizer step.

    The batch's groups are cut into ``minibatches`` consecutive optimizer steps, then each step's groups into
    ``world`` contiguous blocks, one per rank: a group stays in one minibatch and on one rank (and, by
    ``micro_batches``, in one micro-batch), and every minibatch has work while there are at least as many
    groups as minibatches.
    """
    plan: list[list[list[list[int]]]] = [[[] for _ in range(minibatches)] for _ in range(world)]
    for m, step_groups in enumerate(_split(batch_groups(batch), minibatches)):
        for r, rank_groups in enumerate(_split(step_groups, world)):
            part = [i for group in rank_groups for i in group]
            local = micro_batches(batch.select(part), token_budget, max_row_tokens) if part else []
            plan[r][m] = [[part[j] for j in group] for group in local]
    return plan


def loss_units(batch: TrainBatch, indices: list[int], agg: str) -> float:
    """How much of the loss normaliser these sequences make up (see LOSS_UNITS)."""
    if agg not in LOSS_UNITS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {sorted(LOSS_UNITS)}")
    return sum(LOSS_UNITS[agg](batch.loss_mask[i]) for i in indices)


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(progress: float) -> float:
    return 1.0 - progress


LR_SCHEDULES: dict[str, Callable[[float], float]] = {"constant": _constant, "cosine": _cosine, "linear": _linear}


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """Factor on the peak LR for optimizer step ``step`` (0-based): linear warm-up, then the decay.

    Warm-up uses (step + 1) / (warmup + 1), so the first step already moves the weights (HF's step / warmup
    spends it at LR 0). Decay goes from 1 at the end of warm-up to 0 at total_steps, flat after it.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"lr_schedule {schedule!r} needs total_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return LR_SCHEDULES[schedule](progress)


def merge_step_metrics(per_rank: list[dict]) -> dict[str, float]:
    """Combine the ranks' train_step sums into unit-weighted means (see TrainerWorker.train_step)."""
    weight = sum(r["weight"] for r in per_rank)
    keys = sorted({k for r in per_rank for k in r["sums"]})
    metrics = {k: sum(r["sums"].get(k, 0.0) for r in per_rank) / max(weight, 1e-12) for k in keys}
    tokens = sum(r["tokens"] for r in per_rank)
    head = per_rank[0]  # grad norm, LR and step count are the same on every rank
    metrics.update({
        "train/grad_norm": sum(head["grad_norms"]) / max(1, len(head["grad_norms"])),
        "train/lr": sum(head["lrs"]) / max(1, len(head["lrs"])),
        "train/entropy": sum(r["entropy_sum"] for r in per_rank) / max(tokens, 1e-12),
        "train/tokens": tokens,
        "train/optimizer_steps": float(head["optimizer_steps"]),
    })
    if head.get("critic_grad_norms"):
        metrics["train/critic_grad_norm"] = sum(head["critic_grad_norms"]) / len(head["critic_grad_norms"])
    return metrics
