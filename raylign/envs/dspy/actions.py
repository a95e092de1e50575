"""The AutoDSPy action space: a DSPy module and a signature, written by the policy as one line of text.

AutoDSPy (Azim et al., EMNLP 2024; github.com/nafew-azim/AUTODSPy, notebooks ``DSPy_GRPO.ipynb``,
``DSPy_PPO.ipynb``, ``DSPy_Reinforce.ipynb``; the seed README's "Action Space") builds a pipeline
"Module -> Signature -> Stop" from ``MODULES = ["CoT", "Predict"]`` and 15 signatures, sampling each step
from the first-token logits of the allowed names. Here the policy writes the whole action as text instead,
and ``parse_action`` reads it strictly:

    action    := ws* module [ \\t]* "|" [ \\t]* fields [ \\t]* "->" [ \\t]* fields ws*
    fields    := name ([ \\t]* "," [ \\t]* name)*
    module    := name   (an alias in ``MODULES`` whose DSPy module is enabled; ASCII, case-insensitive)
    name      := [A-Za-z_][A-Za-z0-9_]*   (signature field names are case-insensitive)

"Stop" is the end of the text: nothing but whitespace may follow the signature (``| stop``, a period or an
explanation is ``trailing_text``). Case is folded because the seed lower-cases field names before calling
DSPy (``.lower()`` in ``execute_pipeline``), so ``Question -> Answer`` is the seed's ``question -> answer``.
Failures, in the order the text is read: ``empty``; ``malformed`` (no "|", or the module is not a name);
``unknown_module``; ``malformed`` (the signature is not of the shape above); ``unknown_signature`` (well
formed, not in the configured list); ``trailing_text``. Parsing never raises on the text and is linear in
its length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Alias -> DSPy module class. The seed's "CoT" / "Predict" first; the first alias of each class is the
# name the prompt shows. "PoT" is the seed PPO notebook's (unreachable) ``dspy.ProgramOfThought`` branch;
# ReAct is here so configs can enable it, not in the default set (it needs tools).
MODULES: dict[str, str] = {
    "Predict": "Predict",
    "CoT": "ChainOfThought",
    "ChainOfThought": "ChainOfThought",
    "ReAct": "ReAct",
    "PoT": "ProgramOfThought",
    "ProgramOfThought": "ProgramOfThought",
}
DEFAULT_MODULES: tuple[str, ...] = ("ChainOfThought", "Predict")  # the seed's ["CoT", "Predict"]
MODULE_HINTS: dict[str, str] = {
    "Predict": "answers directly",
    "ChainOfThought": "reasons step by step, then answers",
    "ReAct": "reasons and calls tools in a loop, then answers",
    "ProgramOfThought": "writes and runs code, then answers",
}

# Verbatim from the seed notebooks' "Define Action Space" cell (the same list in all three).
SIGNATURES: tuple[str, ...] = (
    "question -> answer", "text -> summary", "question -> reasoning", "question -> hypothesis",
    "problem -> solution", "problem_description -> explanation", "context -> summary", "context -> briefing",
    "word_problem -> solution", "math_problem -> answer", "prompt -> response", "query -> response",
    "text -> response", "prompt -> generated_text", "query -> generated_text",
)

PARSE_REASONS: tuple[str, ...] = ("empty", "malformed", "unknown_module", "unknown_signature", "trailing_text")

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_FIELDS = rf"{_NAME}(?:[ \t]*,[ \t]*{_NAME})*"
_NAME_RE = re.compile(_NAME)
# Character classes on either side of every quantifier are disjoint, so a failed match backtracks linearly.
_SIGNATURE_RE = re.compile(rf"[ \t]*({_FIELDS})[ \t]*->[ \t]*({_FIELDS})")
_COMMA = re.compile(r"[ \t]*,[ \t]*")


@dataclass(frozen=True)
class Action:
    """A parsed pipeline: the DSPy module class name, the signature as configured, and its field names."""

    module: str  # "Predict", "ChainOfThought", ...
    signature: str  # exactly as listed in the signatures: "question -> answer"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def text(self) -> str:
        """The canonical spelling (``ChainOfThought | question -> answer``); ``parse_action`` reads it back."""
        return f"{self.module} | {self.signature}"


@dataclass(frozen=True)
class ParseFailure:
    """Why a reply is not an action: one of ``PARSE_REASONS``."""

    reason: str

    def __post_init__(self):
        if self.reason not in PARSE_REASONS:
            raise ValueError(f"unknown parse failure reason {self.reason!r}; known: {', '.join(PARSE_REASONS)}")


def _fields(group: str) -> tuple[str, ...]:
    return tuple(_COMMA.split(group.strip()))


def signature_fields(signature: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) of ``"a, b -> c"``; ValueError if it is not of that shape or repeats a field."""
    m = _SIGNATURE_RE.fullmatch(signature.strip()) if isinstance(signature, str) else None
    if m is None:
        raise ValueError(f"signature {signature!r} is not of the form 'input, ... -> output, ...'")
    inputs, outputs = _fields(m.group(1)), _fields(m.group(2))
    names = [n.lower() for n in inputs + outputs]
    if len(set(names)) != len(names):
        raise ValueError(f"signature {signature!r} repeats a field name")
    return inputs, outputs


def _key(inputs: Sequence[str], outputs: Sequence[str]) -> str:
    return ", ".join(inputs).lower() + " -> " + ", ".join(outputs).lower()


def resolve_modules(modules: Sequence[str]) -> tuple[str, ...]:
    """DSPy class names of ``modules`` (aliases or class names, any case), in order; ValueError if unknown."""
    by_lower = {alias.lower(): name for alias, name in MODULES.items()}
    unknown = [m for m in modules if not isinstance(m, str) or m.lower() not in by_lower]
    if unknown or not modules:
        raise ValueError(f"unknown DSPy modules {unknown!r}; known: {', '.join(MODULES)}")
    return tuple(dict.fromkeys(by_lower[m.lower()] for m in modules))


def module_name(module: str) -> str:
    """The name the prompt shows for a DSPy class: its first alias in ``MODULES`` (``ChainOfThought`` -> ``CoT``)."""
    return next(alias for alias, name in MODULES.items() if name == module)


def _signature_table(signatures: Sequence[str]) -> dict[str, str]:
    table: dict[str, str] = {}
    for signature in signatures:
        key = _key(*signature_fields(signature))
        if key in table:
            raise ValueError(f"signatures {table[key]!r} and {signature!r} are the same")
        table[key] = signature
    if not table:
        raise ValueError("no signatures configured")
    return table


def parse_action(text, modules: Sequence[str] = DEFAULT_MODULES,
                 signatures: Sequence[str] = SIGNATURES) -> Action | ParseFailure:
    """Read ``module | signature`` (module docstring grammar) against the enabled modules and signatures.

    Never raises on ``text`` (anything that is not a string is ``malformed``, ``None`` is ``empty``); a bad
    ``modules`` or ``signatures`` argument is a config bug and raises ValueError.
    """
    enabled = resolve_modules(modules)
    table = _signature_table(signatures)
    if text is None or (isinstance(text, str) and not text.strip()):
        return ParseFailure("empty")
    if not isinstance(text, str):
        return ParseFailure("malformed")
    head, bar, rest = text.strip().partition("|")
    module = head.strip(" \t")
    if not bar or not _NAME_RE.fullmatch(module):
        return ParseFailure("malformed")
    name = next((n for alias, n in MODULES.items() if alias.lower() == module.lower()), None)
    if name not in enabled:
        return ParseFailure("unknown_module")
    m = _SIGNATURE_RE.match(rest)
    if m is None:
        return ParseFailure("malformed")
    signature = table.get(_key(_fields(m.group(1)), _fields(m.group(2))))
    if signature is None:
        return ParseFailure("unknown_signature")
    if rest[m.end():].strip():
        return ParseFailure("trailing_text")
    inputs, outputs = signature_fields(signature)
    return Action(name, signature, inputs, outputs)


def action_prompt(question: str, modules: Sequence[str] = DEFAULT_MODULES,
                  signatures: Sequence[str] = SIGNATURES) -> list[dict[str, str]]:
    """Chat messages asking the policy to pick a pipeline for ``question``: the choices and the exact format.

    The example line is built from the first enabled module and signature, so it always parses.
    """
    enabled = resolve_modules(modules)
    _signature_table(signatures)
    module_lines = "\n".join(f"- {module_name(m)}: {MODULE_HINTS[m]}" for m in enabled)
    signature_lines = "\n".join(f"- {s}" for s in signatures)
    example = f"{module_name(enabled[0])} | {signatures[0]}"
    system = (
        "You choose the DSPy pipeline that a task model will run to answer a question.\n"
        "Pick one module and one signature from these lists.\n\n"
        f"Modules:\n{module_lines}\n\n"
        f"Signatures (inputs -> outputs):\n{signature_lines}\n\n"
        "Reply with exactly one line, the module name, a '|' and the signature as listed, and nothing else:\n"
        "<module> | <signature>\n"
        f"For example:\n{example}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Question:\n{question}"}]
