"""What a run spent: tokens generated per purpose, tokens trained, and seconds per role (busy and idle).

The loop is synchronous, so a role is busy during the phases it serves and idle for the rest of the run's
timed seconds (every phase plus the loop's own overhead, startup included). Phases map to roles in
``ROLE_PHASES``; a phase that drives several roles counts for the one it waits on most (an eval: the
generators; a weight sync: the trainer, which writes the file the replicas load). The retrievers' seconds are
measured inside ``generate`` (RAG episodes) and moved from the generators to them. Counters come from the
driver (``COUNTERS``, saved in every checkpoint so the totals survive ``--resume``) and from the LM services
(their totals since this process started, added to what the checkpoint held).
"""

from __future__ import annotations

ROLE_PHASES: dict[str, tuple[str, ...]] = {
    "generators": ("generate", "mc_rollouts", "eval_before", "eval_after"),
    "trainer": ("train", "logprobs", "values", "sync", "checkpoint", "reset_policy", "trainer_restart"),
    "reference": ("ref_logprobs",),
    "reward": ("score",),
    "judge": ("judge",),
}
# RayCluster attributes that count what the run spent (restored from the checkpoint on resume).
COUNTERS = ("tokens_generated", "mc_tokens", "judge_tokens", "eval_tokens", "tokens_trained", "search_s")
# Tokens per purpose: name in the summary -> the counter or LM-service metric that holds it.
PURPOSES = {"rollouts": "tokens_generated", "mc_continuations": "mc_tokens", "judge": "judge_tokens",
            "eval": "eval_tokens", "dspy_task_model": "task_model/tokens", "reward_judge_model": "judge_model/tokens"}
# Tokens each role processed, for its tokens/s.
ROLE_TOKENS = {"generators": ("tokens_generated", "mc_tokens", "eval_tokens"), "trainer": ("tokens_trained",),
               "judge": ("judge_tokens",)}


def merged_counters(driver: dict[str, float], services: dict[str, float], saved: dict[str, float]) -> dict[str, float]:
    """The run's totals: the driver's counters (already restored on resume) plus the services' tokens since this
    process started on top of what the checkpoint saved of them."""
    out = dict(driver)
    for key in ("task_model/tokens", "judge_model/tokens"):
        if key in services or key in saved:
            out[key] = saved.get(key, 0.0) + services.get(key, 0.0)
    return out


# Roles every run has; the others (reference, reward, judge) are listed only when one of their phases ran.
ALWAYS = ("generators", "trainer")


def role_seconds(timing: dict[str, float], search_s: float) -> dict[str, dict[str, float]]:
    """{role: {busy_s, idle_s}} from seconds per phase (no ``timing/`` prefix), over their sum. A run without a
    judge, reference or reward phase lists no such role."""
    total = sum(timing.values())
    busy = {role: sum(timing.get(p, 0.0) for p in phases) for role, phases in ROLE_PHASES.items()
            if role in ALWAYS or any(p in timing for p in phases)}
    if search_s:
        busy["generators"] = max(0.0, busy["generators"] - search_s)
        busy["retriever"] = search_s
    return {role: {"busy_s": s, "idle_s": max(0.0, total - s)} for role, s in busy.items()}


def cost_summary(timing: dict[str, float], counters: dict[str, float]) -> dict:
    """The summary's ``cost`` section: tokens per purpose, tokens trained, seconds and tokens/s per role."""
    roles = role_seconds(timing, counters.get("search_s", 0.0))
    for role, keys in ROLE_TOKENS.items():
        if role not in roles:
            continue
        tokens = sum(counters.get(k, 0.0) for k in keys)
        busy = roles[role]["busy_s"]
        roles[role]["tokens_per_s"] = tokens / busy if busy > 0 else 0.0
    return {"tokens_generated": {name: counters.get(key, 0.0) for name, key in PURPOSES.items()},
            "tokens_trained": counters.get("tokens_trained", 0.0), "total_s": sum(timing.values()), "roles": roles}


def cost_metrics(cost: dict) -> dict[str, float]:
    """The cost section flattened for MLflow: ``cost/tokens/<purpose>``, ``cost/<role>/busy_s`` ..."""
    out = {f"cost/tokens/{k}": float(v) for k, v in cost["tokens_generated"].items()}
    out["cost/tokens/trained"] = float(cost["tokens_trained"])
    out.update({f"cost/{role}/{k}": float(v) for role, values in cost["roles"].items() for k, v in values.items()})
    return out
