"""ReferenceActor: the frozen reference policy for KL, in its own Ray actor (``trainer.ref_model: actor``).

The alternative to a bf16 copy inside every trainer worker (``ref_model: trainer``): one copy for the whole
run, which can sit on its own GPU or node and keeps the trainer's memory for the policy. It never changes,
so checkpoints do not hold it; a resumed run rebuilds it from ``model.name``. Log-probs use the trainer's
packed layout and the same per-token math (trainer_math), so both placements give the same numbers.
"""

from __future__ import annotations

import os

import ray

from raylign.actors.trainer_math import (
    check_batch,
    micro_batches,
    packing_row_tokens,
    pad_batch,
    sequence_logprobs,
    unpad,
)
from raylign.config import ModelConfig, TrainerConfig
from raylign.types import TrainBatch


@ray.remote
class ReferenceActor:
    def __init__(self, model_path: str, model_cfg: ModelConfig, cfg: TrainerConfig):
        import torch

        from raylign.models import load_hf_model, model_on_this_node

        # Ray pins threads to the actor's logical CPUs; reference log-probs run while the trainer waits.
        torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)
        self.device = torch.device("cuda" if cfg.use_gpu else "cpu")
        model_path = model_on_this_node(model_cfg, model_path)
        self.model = load_hf_model(model_path, "bfloat16" if cfg.bf16 else "float32",  # as the trainer computes
                                   model_cfg.trust_remote_code).to(self.device)
        self.model.eval().requires_grad_(False)
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self.row_tokens = packing_row_tokens(self.model.config, cfg.packed_row_tokens)
        self.token_budget = cfg.micro_batch_tokens

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Per sequence, in batch order: log p_ref of each completion token (temperature 1)."""
        import torch

        check_batch(batch)
        out: dict[int, list[float]] = {}
        with torch.no_grad():
            for group in micro_batches(batch, self.token_budget, self.row_tokens):
                tensors = {k: v.to(self.device) for k, v in pad_batch(batch.select(group), self.pad_id,
                                                                      self.row_tokens).items()}
                out.update(unpad(sequence_logprobs(self.model, tensors)[0], batch, group))
        return [out[i] for i in range(len(batch))]

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        """Test hook: the fault tests SIGKILL this process."""
        return os.getpid()
