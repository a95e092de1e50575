"""Build and run the policy's parsed pipeline as a real DSPy program on the task model.

The seed's ``execute_pipeline`` builds ``dspy.Predict`` or ``dspy.ChainOfThought`` from the chosen
signature (field names lower-cased), calls it on the question and reads the signature's output; the
REINFORCE notebook also runs a fixed ``question -> reasoning -> answer`` pipeline. Here both run under
DSPy's ChatAdapter with its JSON fallback off (one adapter, one LM call per predictor: the fallback would
make a second call with another prompt format), and never raise: a reply the adapter cannot parse keeps
its raw text as the output (the regex stage can still read an answer from it), any other failure has no
output. Every run builds a fresh module and enters its own ``dspy.context``, which is a contextvar, so
many threads (DSPy's one example per thread) can run against one shared LM at once; LM calls are counted
per run by a DSPy callback in that context, so the counts of concurrent runs do not mix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import dspy
from dspy.utils.callback import BaseCallback

from raylign.envs.dspy.actions import Action

# DSPy class name (``Action.module``) -> how to build it from a signature string. ReAct gets no tools but
# DSPy's own ``finish``; ProgramOfThought is deprecated in DSPy 3.4 (a DeprecationWarning at construction)
# and runs the code it writes in DSPy's Deno sandbox, so without Deno it ends as a program_error.
BUILDERS: dict[str, Callable[[str], dspy.Module]] = {
    "Predict": dspy.Predict,
    "ChainOfThought": dspy.ChainOfThought,
    "ReAct": lambda signature: dspy.ReAct(signature, tools=[]),
    "ProgramOfThought": dspy.ProgramOfThought,
}
EVENTS: tuple[str, ...] = ("adapter_parse_error", "program_error")

FIXED_PIPELINE = "Predict | question -> reasoning, then Predict | question, reasoning -> answer"


@dataclass
class ProgramRun:
    """One pipeline run: the output text (None if there is none), what went wrong, LM calls and wall time."""

    output: str | None
    event: str | None  # None, or one of EVENTS
    lm_calls: int
    seconds: float
    detail: str | None = None  # for "program_error": the exception's type and message


def _signature(action: Action) -> str:
    return ", ".join(action.inputs).lower() + " -> " + ", ".join(action.outputs).lower()


def build_program(action: Action) -> dspy.Module:
    """The DSPy module ``action.module`` over ``action``'s signature, field names lower-cased as the seed."""
    builder = BUILDERS.get(action.module)
    if builder is None:
        raise ValueError(f"no DSPy builder for module {action.module!r}; known: {', '.join(BUILDERS)}")
    try:
        return builder(_signature(action))
    except Exception as err:
        raise ValueError(f"cannot build dspy.{action.module} for {action.signature!r}: {err}") from err


def program_inputs(action: Action, question: str, context: str | None) -> dict[str, str]:
    """The keyword inputs of ``action``'s program for one question and its (optional) passages.

    With a non-empty ``context`` and an input field named ``context`` next to one other input, the passages
    go to ``context`` and the question to the other. Otherwise the signature has one input and it gets the
    question, preceded by the passages as ``"Context:\\n{context}\\n\\nQuestion: {question}"`` when there are
    some: the seed passes HotpotQA passages inside the query, and a signature such as ``context -> summary``
    must still see the question. Any other shape of inputs is a ValueError.
    """
    names = [name.lower() for name in action.inputs]
    others = [name for name in names if name != "context"]
    if context and "context" in names and len(others) == 1:
        return {"context": context, others[0]: question}
    if len(names) != 1:
        raise ValueError(f"signature {action.signature!r}: expected one input, or 'context' and one other")
    return {names[0]: f"Context:\n{context}\n\nQuestion: {question}" if context else question}


class _LMCalls(BaseCallback):
    """Counts the LM calls made inside the ``dspy.context`` it is installed in (failed calls included)."""

    def __init__(self):
        self.calls = 0

    def on_lm_start(self, call_id, instance, inputs):
        self.calls += 1


def _run(make: Callable[[], tuple[dspy.Module, dict[str, str]]], output_field: str, lm: dspy.LM) -> ProgramRun:
    """Build and call a program under ChatAdapter without the JSON fallback; never raises on its failures."""
    counter = _LMCalls()
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    start = time.perf_counter()
    output, event, detail = None, None, None
    try:
        # disable_history: DSPy would keep every prompt and reply (up to 10,000, globally and per LM) for a run's life
        with dspy.context(lm=lm, adapter=adapter, callbacks=[*dspy.settings.callbacks, counter], disable_history=True):
            program, inputs = make()
            value = program(**inputs)[output_field]
        output = None if value is None else str(value)
    except dspy.AdapterParseError as err:
        output, event = err.lm_response, "adapter_parse_error"
    except Exception as err:
        event, detail = "program_error", f"{type(err).__name__}: {err}"
    return ProgramRun(output, event, counter.calls, time.perf_counter() - start, detail)


def run_program(action: Action, question: str, context: str | None, lm: dspy.LM) -> ProgramRun:
    """Run ``action``'s pipeline on one question with ``lm``; the output is its last output field's text
    (ChainOfThought's answer, not its reasoning). Thread-safe; never raises (see ``ProgramRun.event``)."""
    def make():
        return build_program(action), program_inputs(action, question, context)
    return _run(make, action.outputs[-1].lower(), lm)


class FixedPipeline(dspy.Module):
    """The seed REINFORCE notebook's fixed pipeline (``FIXED_PIPELINE``): reason first, then answer."""

    def __init__(self):
        super().__init__()
        self.reason = dspy.Predict("question -> reasoning")
        self.answer = dspy.Predict("question, reasoning -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        reasoning = self.reason(question=question).reasoning
        return self.answer(question=question, reasoning=reasoning)


def run_fixed_pipeline(question: str, context: str | None, lm: dspy.LM) -> ProgramRun:
    """``FIXED_PIPELINE`` on one question (passages go with the question, as ``program_inputs`` does for a
    one-input signature); two LM calls when both succeed. Thread-safe; never raises."""
    text = f"Context:\n{context}\n\nQuestion: {question}" if context else question
    return _run(lambda: (FixedPipeline(), {"question": text}), "answer", lm)
