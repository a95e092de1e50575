"""transformers ``generate`` as a generation backend: slower than vLLM, but runs anywhere torch does.

A weight sync is a safetensors file of full weights, or a peft LoRA adapter folder (``adapters.py``). An adapter
is merged into the model's own weights: W = W0 + scale * B @ A, always from a pristine copy W0 of each adapted
layer, so the next version replaces the last instead of adding to it. A full-weights file becomes the new W0 and
turns any adapter off. Adapters of any rank merge here, so ``lora_rank`` only keeps one backend signature.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from raylign.actors.backends.adapters import is_adapter_path, read_adapter
from raylign.actors.backends.weights import iter_safetensors
from raylign.config import GeneratorConfig, ModelConfig
from raylign.types import Completion, SamplingSpec


class HFBackend:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig, lora_rank: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(gen_cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code
        ).eval()
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.batch_size = gen_cfg.batch_size
        self.linears = _linears(self.model)
        self.base: dict[str, torch.Tensor] = {}  # W0 of each layer an adapter has touched since the last full load

    @torch.no_grad()
    def generate(self, prompts_ids: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]:
        flat = [ids for ids in prompts_ids for _ in range(spec.n)]
        done: list[Completion] = []
        for start in range(0, len(flat), self.batch_size):
            done += self._generate_batch(flat[start:start + self.batch_size], spec)
        return [done[i * spec.n:(i + 1) * spec.n] for i in range(len(prompts_ids))]

    def _generate_batch(self, batch: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        width = max(len(ids) for ids in batch)
        input_ids_B_T = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in batch])
        mask_B_T = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        sampling = dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0) if spec.temperature > 0 \
            else dict(do_sample=False)
        out = self.model.generate(
            input_ids=input_ids_B_T, attention_mask=mask_B_T, max_new_tokens=spec.max_new_tokens,
            min_new_tokens=spec.max_new_tokens if spec.ignore_eos else None,
            pad_token_id=self.pad_id, eos_token_id=self.eos_ids, return_dict_in_generate=True, output_logits=True,
            stop_strings=list(spec.stop) or None, tokenizer=self.tokenizer if spec.stop else None, **sampling,
        )
        new_B_N = out.sequences[:, width:]
        # Log-probs of the sampled distribution (tempered; greedy: raw), as vLLM's processed_logprobs mode gives
        # them (top_p < 1 is not renormalised here).
        logits_B_N_V = torch.stack(out.logits, dim=1).float() / (spec.temperature if spec.temperature > 0 else 1.0)
        logprobs_B_N = torch.log_softmax(logits_B_N_V, -1).gather(-1, new_B_N.unsqueeze(-1)).squeeze(-1)
        return [self._completion(ids, new_B_N[i].tolist(), logprobs_B_N[i].tolist(), spec) for i, ids in enumerate(batch)]

    def _completion(self, prompt_ids: list[int], new_ids: list[int], logprobs: list[float], spec: SamplingSpec) -> Completion:
        end = next((i + 1 for i, tok in enumerate(new_ids) if tok in self.eos_ids), None)
        text_ids = new_ids[:end - 1] if end else new_ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        stopped = end is not None or any(s in text for s in spec.stop)
        kept = new_ids[:end] if end else new_ids
        return Completion(prompt_ids=list(prompt_ids), token_ids=kept, text=text, logprobs=logprobs[:len(kept)],
                          finish_reason="stop" if stopped else "length")

    def reseed(self, seed: int) -> None:
        torch.manual_seed(seed)

    @torch.no_grad()
    def load_weights(self, path: str, version: int) -> None:
        if is_adapter_path(path):
            self._merge_adapter(path)
            return
        self.load_state(iter_safetensors(path), version)

    @torch.no_grad()
    def load_state(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Full weights by HF name (a tied lm_head may be absent: it is the embedding)."""
        self._restore_base()
        self.base = {}  # these weights are the new base
        params = dict(self.model.named_parameters())
        for name, tensor in tensors:
            if name in params:
                params[name].copy_(tensor)

    def _merge_adapter(self, folder: str) -> None:
        shapes = {name: tuple(layer.weight.shape) for name, layer in self.linears.items()}
        adapter = read_adapter(folder, shapes)  # checked whole before any weight changes
        self._restore_base()
        for name, A_r_In, B_Out_r in adapter.factors():
            weight = self.linears[name].weight
            base = self.base.setdefault(name, weight.detach().clone())
            weight.copy_((base.float() + adapter.scale * (B_Out_r.float() @ A_r_In.float())).to(weight.dtype))

    def _restore_base(self) -> None:
        for name, base in self.base.items():
            self.linears[name].weight.copy_(base)


def _linears(model) -> dict[str, torch.nn.Linear]:
    """The linear layers an adapter may target, by module name; a head tied to the embedding is left out (merging
    into it would change the embedding too, where peft adapts the head alone)."""
    embedding = model.get_input_embeddings().weight
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.weight is not embedding}


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({i for i in ids if i is not None})
