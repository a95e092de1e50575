"""GeneratorActor: one generation engine replica (vLLM or transformers) behind a Ray actor.

Weights arrive as a path on this node (``load_weights``: the file transport) or as buckets in Ray's object store
(``load_buckets``: the ray transport, from a trainer on any node). ``pid``, ``inject_hang`` and
``inject_corrupt_sync`` are test hooks: the fault tests SIGKILL the process, make the next generate call stall as
a wedged engine would, or flip a byte of the next bucket as a broken transfer would; GeneratorPool must recover
from all three.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
from safetensors.torch import save_file

from raylign.actors.backends import GENERATORS
from raylign.actors.lora import write_adapter
from raylign.actors.weight_sync import WeightBuckets, read_buckets
from raylign.chat import encode_chat
from raylign.config import GeneratorConfig, ModelConfig
from raylign.models import model_on_this_node
from raylign.types import Completion, SamplingSpec

Prompt = list[int] | list[dict[str, str]]  # token ids, or chat messages rendered with the model's template


@ray.remote
class GeneratorActor:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig, replica: int = 0,
                 lora_rank: int | None = None):
        import torch
        from transformers import AutoTokenizer

        # Ray sets OMP_NUM_THREADS to the actor's logical CPUs (often 1); in synchronous RL nothing else computes
        # while the replicas generate, so they share the machine's cores.
        torch.set_num_threads(gen_cfg.torch_threads or max(1, (os.cpu_count() or 1) // gen_cfg.num_replicas))
        self.replica = replica
        self.version = 0
        self.hang_s = 0.0
        self.corrupt_next_sync = False
        model_path = model_on_this_node(model_cfg, model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        self.backend = GENERATORS[gen_cfg.backend](model_path, model_cfg, gen_cfg, lora_rank=lora_rank)

    def ready(self) -> int:
        return self.replica

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[list[Completion]]:
        if self.hang_s:
            hang, self.hang_s = self.hang_s, 0.0
            time.sleep(hang)
        prompts_ids = [self._ids(p) for p in prompts]
        groups = self.backend.generate(prompts_ids, spec)
        for group in groups:
            for c in group:
                c.policy_version, c.replica = self.version, self.replica
        return groups

    def load_weights(self, path: str, version: int) -> float:
        """Serve the trainer's weights for ``version``: a safetensors file of full weights, or a peft LoRA adapter
        folder (needs ``lora_rank`` on vLLM); returns seconds taken. A bad folder raises ``AdapterError`` and the
        previous weights and version stay."""
        start = time.perf_counter()
        self.backend.load_weights(path, version)
        self.version = version
        return time.perf_counter() - start

    def load_buckets(self, sync: WeightBuckets, version: int, timeout_s: float) -> float:
        """Serve a sync sent over Ray (``weight_sync``) as ``version``: full weights stream into the engine, one
        checked bucket at a time; an adapter is written to a folder on this node and loaded as one. A bucket
        that fails its checksum or takes over ``timeout_s`` to arrive raises ``WeightSyncError``. Returns seconds taken."""
        start = time.perf_counter()
        corrupt, self.corrupt_next_sync = self.corrupt_next_sync, False
        tensors = read_buckets(sync, timeout_s, corrupt)
        if sync.kind == "adapter":
            folder = Path(tempfile.gettempdir()) / "raylign-adapters" / f"{os.getpid()}-v{version:06d}"
            write_adapter(folder, dict(tensors), sync.adapter_config, save_file)
            self.backend.load_weights(str(folder), version)
            for old in folder.parent.glob(f"{os.getpid()}-v*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        else:
            self.backend.load_state(tensors, version)
        self.version = version
        return time.perf_counter() - start

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def inject_corrupt_sync(self) -> None:
        """Test hook: the next load_buckets sees one flipped byte in its first bucket."""
        self.corrupt_next_sync = True

    def reseed(self, seed: int) -> None:
        self.backend.reseed(seed)

    def policy_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

    def inject_hang(self, seconds: float) -> None:
        """Test hook: the next generate call sleeps this long before working."""
        self.hang_s = seconds

    def _ids(self, prompt: Prompt) -> list[int]:
        if prompt and isinstance(prompt[0], dict):
            return encode_chat(self.tokenizer, prompt)
        return list(prompt)
