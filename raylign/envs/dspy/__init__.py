"""AutoDSPy env (issue 12): the policy picks a DSPy module and signature; the pipeline's answer is rewarded.

Pure parts so far: the action space and its strict parser (``actions``), the regex reward stage and its
combination with an LLM judge (``rewards``). No ``dspy`` import here: it is only needed to run pipelines.
"""

from __future__ import annotations

from raylign.envs.dspy.actions import (
    DEFAULT_MODULES,
    MODULES,
    PARSE_REASONS,
    SIGNATURES,
    Action,
    ParseFailure,
    action_prompt,
    parse_action,
)
from raylign.envs.dspy.rewards import HOWS, combine, exact_match, needs_judge, regex_score

__all__ = [
    "DEFAULT_MODULES", "HOWS", "MODULES", "PARSE_REASONS", "SIGNATURES", "Action", "ParseFailure",
    "action_prompt", "combine", "exact_match", "needs_judge", "parse_action", "regex_score",
]
