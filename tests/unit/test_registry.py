"""Every algorithm has one registry entry and one config section, and declares its needs from its config."""

from raylign.algorithms.registry import ALGORITHMS, LOSSES
from raylign.config import ALGORITHM_CONFIGS


def test_every_algorithm_has_a_config_section_and_declares_its_needs():
    assert set(ALGORITHMS) == set(ALGORITHM_CONFIGS)
    needs = {}
    for name, algo in ALGORITHMS.items():
        cfg = ALGORITHM_CONFIGS[name]()
        needs[name] = (algo.data, algo.generation(cfg), algo.reference(cfg), algo.critic(cfg), algo.judge(cfg))
    assert needs == {
        "grpo": ("prompts", True, False, None, False), "rloo": ("prompts", True, False, None, False),
        "reinforce": ("prompts", True, False, None, False), "reinforce_pp": ("prompts", True, False, None, False),
        "ppo": ("prompts", True, False, "value_head", False),
        "vineppo": ("prompts", True, False, None, False), "sft": ("examples", False, False, None, False),
        "dpo": ("pairs", False, True, None, False), "online_dpo": ("prompts", True, True, None, False),
        "step_dpo": ("pairs", False, True, None, False), "restem": ("prompts", True, False, None, False),
    }
    # a reference only when the KL term is on; stepwise DPO samples only for MC scores, asks a judge only for its
    assert ALGORITHMS["grpo"].reference(ALGORITHM_CONFIGS["grpo"](kl_beta=0.1))
    assert ALGORITHMS["step_dpo"].generation(ALGORITHM_CONFIGS["step_dpo"](step_scores="mc"))
    assert ALGORITHMS["step_dpo"].judge(ALGORITHM_CONFIGS["step_dpo"](step_scores="judge"))


def test_losses_of_the_preference_family_average_over_their_units():
    assert LOSSES["sft"].unit({}) == "token" and LOSSES["dpo"].unit({}) == "sequence"
    assert LOSSES["dpo"].fields == {"ref_logprobs_B_T", "chosen_B"}
    assert LOSSES["step_dpo"].fields == {"ref_logprobs_B_T", "chosen_B", "token_weights_B_T"}
