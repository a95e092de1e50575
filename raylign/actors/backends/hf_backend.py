"""transformers ``generate`` as a generation backend: slower than vLLM, but runs anywhere torch does."""

from __future__ import annotations

import torch

from raylign.actors.backends.weights import iter_safetensors
from raylign.config import GeneratorConfig, ModelConfig
from raylign.types import Completion, SamplingSpec


class HFBackend:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(gen_cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code
        ).eval()
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.batch_size = gen_cfg.batch_size

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
        # Raw (untempered) logprobs of the chosen tokens, matching vLLM's default raw_logprobs mode.
        logits_B_N_V = torch.stack(out.logits, dim=1).float()
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

    def load_weights(self, path: str) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in iter_safetensors(path):
                if name in params:
                    params[name].copy_(tensor)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({i for i in ids if i is not None})
