"""AutoDSPy programs on real DSPy with scripted task models (no network, no model): every module builds
over every seed signature, inputs with and without passages, the output field, both failure events, exact
LM call counts, the fixed pipeline, the engine's request conversion, and the batching completer's
grouping, routing, error propagation and lone-caller path."""

from __future__ import annotations

import re
import threading
import time

import dspy
import pytest
from dspy.lm15 import Config, Message, Request, TextPart

from raylign.envs.dspy.actions import MODULES, SIGNATURES, Action, parse_action, signature_fields
from raylign.envs.dspy.lm import BatchingCompleter, CompleterEngine, chat_messages, make_lm
from raylign.envs.dspy.program import (
    BUILDERS,
    build_program,
    program_inputs,
    run_fixed_pipeline,
    run_program,
)

ALL_MODULES = tuple(dict.fromkeys(MODULES.values()))
OUTPUT_NAMES = sorted({n for s in SIGNATURES for n in signature_fields(s)[1]} | {"reasoning"})


def action(text: str) -> Action:
    parsed = parse_action(text, modules=ALL_MODULES)
    assert isinstance(parsed, Action), parsed
    return parsed


def reply(**fields: str) -> str:
    """A reply in ChatAdapter's format carrying ``fields``."""
    return "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in fields.items()) + "[[ ## completed ## ]]"


def scripted(*texts: str):
    """A Complete answering each conversation with the next text, recording every batch it gets."""
    queue, batches = list(texts), []

    def complete(chats, temperature, max_tokens):
        batches.append((chats, temperature, max_tokens))
        return [queue.pop(0) for _ in chats]
    return complete, batches


def lm_over(complete, temperature=0.0, max_tokens=64):
    return make_lm(BatchingCompleter(complete, wait_s=0.0), "raylign/task", temperature, max_tokens)


def user_text(chat) -> str:
    return next(m["content"] for m in chat if m["role"] == "user")


# --- building ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ALL_MODULES)
@pytest.mark.parametrize("signature", SIGNATURES)
def test_every_module_builds_every_signature(module, signature):
    program = build_program(Action(module, signature, *signature_fields(signature)))
    inputs, outputs = signature_fields(signature)
    assert type(program).__name__ == module
    core = program.predict.signature if module == "ChainOfThought" else program.signature
    assert list(core.input_fields) == list(inputs)
    assert list(core.output_fields)[-len(outputs):] == list(outputs)
    if module == "ChainOfThought":  # "question -> reasoning": DSPy's reasoning field and the signature's are one
        assert list(core.output_fields) == list(dict.fromkeys(["reasoning", *outputs]))


def test_build_lower_cases_fields_and_refuses_unknown_modules():
    program = build_program(Action("Predict", "Question -> Answer", ("Question",), ("Answer",)))
    assert list(program.signature.input_fields) == ["question"]
    assert list(program.signature.output_fields) == ["answer"]
    assert set(BUILDERS) == set(MODULES.values())
    with pytest.raises(ValueError, match="'Retrieve'"):
        build_program(Action("Retrieve", "question -> answer", ("question",), ("answer",)))


# --- inputs ---------------------------------------------------------------------------------------------

def test_program_inputs_without_context_gives_the_question_to_the_one_input():
    for signature in SIGNATURES:
        a = Action("Predict", signature, *signature_fields(signature))
        assert program_inputs(a, "What is 2+3?", None) == {a.inputs[0]: "What is 2+3?"}
        assert program_inputs(a, "What is 2+3?", "") == {a.inputs[0]: "What is 2+3?"}


def test_program_inputs_with_context():
    a = action("Predict | question -> answer")
    assert program_inputs(a, "Who?", "P1. P2.") == {"question": "Context:\nP1. P2.\n\nQuestion: Who?"}
    only_context = action("Predict | context -> summary")  # no other input: the question must ride along
    assert program_inputs(only_context, "Who?", "P1.") == {"context": "Context:\nP1.\n\nQuestion: Who?"}
    split = Action("Predict", "context, question -> answer", ("context", "question"), ("answer",))
    assert program_inputs(split, "Who?", "P1.") == {"context": "P1.", "question": "Who?"}
    two = Action("Predict", "a, b -> c", ("a", "b"), ("c",))
    with pytest.raises(ValueError, match="'a, b -> c'"):
        program_inputs(two, "Who?", None)


# --- running --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["Predict", "ChainOfThought"])
def test_run_program_returns_the_last_output_field_of_every_signature(module):
    for signature in SIGNATURES:
        complete, batches = scripted(reply(**{n: f"{n} value" for n in OUTPUT_NAMES}))
        a = Action(module, signature, *signature_fields(signature))
        run = run_program(a, "What is 2+3?", None, lm_over(complete))
        assert (run.output, run.event, run.lm_calls) == (f"{a.outputs[-1]} value", None, 1), signature
        assert len(batches) == 1 and "What is 2+3?" in user_text(batches[0][0][0])
        assert run.seconds >= 0


def test_chain_of_thought_output_is_the_answer_not_the_reasoning():
    complete, _ = scripted(reply(reasoning="2 plus 3 is 5", answer="[5]"))
    run = run_program(action("CoT | question -> answer"), "What is 2+3?", None, lm_over(complete))
    assert (run.output, run.event, run.lm_calls, run.detail) == ("[5]", None, 1, None)


def test_context_reaches_the_task_model():
    complete, batches = scripted(reply(answer="Paris"))
    run = run_program(action("Predict | question -> answer"), "Capital?", "France: Paris.", lm_over(complete))
    assert run.output == "Paris"
    assert "Context:\nFrance: Paris.\n\nQuestion: Capital?" in user_text(batches[0][0][0])


def test_a_reply_off_the_adapter_format_keeps_its_raw_text():
    complete, batches = scripted("I think the answer is 5.")
    run = run_program(action("CoT | question -> answer"), "What is 2+3?", None, lm_over(complete))
    assert (run.output, run.event, run.lm_calls) == ("I think the answer is 5.", "adapter_parse_error", 1)
    assert len(batches) == 1  # the JSON fallback would have made a second call


def test_an_exception_in_complete_is_a_program_error_not_a_raise():
    def complete(chats, temperature, max_tokens):
        raise RuntimeError("generator pool down")
    run = run_program(action("Predict | question -> answer"), "q", None, lm_over(complete))
    assert (run.output, run.event, run.lm_calls) == (None, "program_error", 1)
    assert "generator pool down" in run.detail


def test_a_program_that_cannot_be_built_is_a_program_error():
    complete, batches = scripted()
    run = run_program(Action("Retrieve", "question -> answer", ("question",), ("answer",)), "q", None,
                      lm_over(complete))
    assert (run.output, run.event, run.lm_calls, batches) == (None, "program_error", 0, [])
    assert run.detail.startswith("ValueError")


def test_react_without_tools_finishes_in_two_calls():
    complete, batches = scripted(
        reply(next_thought="I know it", next_tool_name="finish", next_tool_args="{}"),
        reply(reasoning="2 plus 3", answer="5"),
    )
    run = run_program(action("ReAct | question -> answer"), "What is 2+3?", None, lm_over(complete))
    assert (run.output, run.event, run.lm_calls, len(batches)) == ("5", None, 2, 2)


def test_fixed_pipeline_reasons_then_answers():
    complete, batches = scripted(reply(reasoning="2 plus 3 is 5"), reply(answer="[5]"))
    run = run_fixed_pipeline("What is 2+3?", None, lm_over(complete))
    assert (run.output, run.event, run.lm_calls) == ("[5]", None, 2)
    second = user_text(batches[1][0][0])
    assert "What is 2+3?" in second and "2 plus 3 is 5" in second


def test_fixed_pipeline_failures():
    complete, _ = scripted(reply(reasoning="r"), "just 5")
    run = run_fixed_pipeline("q", "passages", lm_over(complete))
    assert (run.output, run.event, run.lm_calls) == ("just 5", "adapter_parse_error", 2)

    def down(chats, temperature, max_tokens):
        raise ConnectionError("no")
    run = run_fixed_pipeline("q", None, lm_over(down))
    assert (run.output, run.event, run.lm_calls) == (None, "program_error", 1)


def test_concurrent_runs_share_one_lm_and_batch_onto_one_call():
    def complete(chats, temperature, max_tokens):
        batches.append(len(chats))
        return [reply(answer=re.search(r"question #(\d+)", user_text(chat)).group(1)) for chat in chats]
    batches, runs = [], {}
    lm = make_lm(BatchingCompleter(complete, wait_s=5.0, max_batch=16), "raylign/task", 0.0, 64)
    a = action("Predict | question -> answer")

    def one(i):
        runs[i] = run_program(a, f"question #{i} here", None, lm)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert batches == [16]  # the 16th request filled the batch; nobody waited out the 5 s
    assert {i: (r.output, r.event, r.lm_calls) for i, r in runs.items()} == {i: (str(i), None, 1) for i in range(16)}


# --- engine ---------------------------------------------------------------------------------------------

def test_engine_converts_the_request_and_falls_back_to_its_defaults():
    seen = []

    def completer(chat, temperature, max_tokens):
        seen.append((chat, temperature, max_tokens))
        return "ok"
    engine = CompleterEngine(completer, temperature=0.5, max_tokens=32)
    request = Request(model="raylign/task", system=(TextPart("be"), TextPart("brief")),
                      messages=(Message.user("hi"), Message.assistant("hello"), Message.user("2+3?")))
    response = engine.complete(request)
    assert response.message.text == "ok" and response.finish_reason == "stop"
    assert seen[0] == ([{"role": "system", "content": "be\nbrief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+3?"}], 0.5, 32)
    engine.complete(Request(model="m", system="s", messages=(Message.user("x"),),
                            config=Config(temperature=0.0, max_tokens=7)))
    assert seen[1] == ([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], 0.0, 7)
    assert [e.type for e in engine.stream(request)][0] == "start"
    assert chat_messages(Request(model="m", messages=(Message.user("y"),))) == [{"role": "user", "content": "y"}]


def test_make_lm_passes_settings_and_per_call_overrides():
    complete, batches = scripted(reply(answer="a"), reply(answer="b"))
    lm = lm_over(complete, temperature=0.2, max_tokens=99)
    assert (lm.cache, lm.num_retries) == (False, 0)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        dspy.Predict("question -> answer")(question="q")
        dspy.Predict("question -> answer")(question="q", config={"temperature": 0.9})
    assert [(t, m) for _, t, m in batches] == [(0.2, 99), (0.9, 99)]  # not cached: the same prompt ran twice


# --- batching -------------------------------------------------------------------------------------------

def echo(chats, temperature, max_tokens):
    return [f"{chat[0]['content']}@{temperature}" for chat in chats]


def call_all(completer, items, results):
    """Call ``completer`` from one thread per (index, content, temperature), all released at once."""
    barrier = threading.Barrier(len(items))

    def one(i, content, temperature):
        barrier.wait()
        try:
            results[i] = completer([{"role": "user", "content": content}], temperature, 16)
        except Exception as err:
            results[i] = err
    threads = [threading.Thread(target=one, args=item) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)


def test_batching_fills_batches_of_max_batch_and_routes_each_reply():
    sizes = []

    def complete(chats, temperature, max_tokens):
        sizes.append(len(chats))
        return echo(chats, temperature, max_tokens)
    completer, results = BatchingCompleter(complete, wait_s=5.0, max_batch=4), {}
    call_all(completer, [(i, f"m{i}", 0.0) for i in range(16)], results)
    assert sizes == [4, 4, 4, 4] and (completer.calls, completer.requests) == (4, 16)
    assert results == {i: f"m{i}@0.0" for i in range(16)}


def test_batching_within_the_wait_window():
    release, sizes = threading.Event(), []

    def complete(chats, temperature, max_tokens):
        sizes.append(len(chats))
        release.wait(5)  # the first batch holds the pool while the rest queue behind it
        return echo(chats, temperature, max_tokens)
    completer, results = BatchingCompleter(complete, wait_s=0.2), {}
    timer = threading.Timer(0.3, release.set)
    timer.start()
    call_all(completer, [(i, f"m{i}", 0.0) for i in range(16)], results)
    assert completer.calls <= 2 and sum(sizes) == 16 == completer.requests
    assert results == {i: f"m{i}@0.0" for i in range(16)}


def test_batching_keeps_temperatures_apart():
    sizes = []

    def complete(chats, temperature, max_tokens):
        sizes.append((temperature, len(chats)))
        return echo(chats, temperature, max_tokens)
    completer, results = BatchingCompleter(complete, wait_s=5.0, max_batch=3), {}
    call_all(completer, [(i, f"m{i}", 0.0 if i < 3 else 1.0) for i in range(6)], results)
    assert sorted(sizes) == [(0.0, 3), (1.0, 3)]
    assert results == {i: f"m{i}@{0.0 if i < 3 else 1.0}" for i in range(6)}


def test_batching_raises_complete_errors_in_every_thread():
    def complete(chats, temperature, max_tokens):
        raise RuntimeError("pool down")
    completer, results = BatchingCompleter(complete, wait_s=5.0, max_batch=4), {}
    call_all(completer, [(i, "m", 0.0) for i in range(4)], results)
    assert completer.calls == 1
    assert all(isinstance(e, RuntimeError) and str(e) == "pool down" for e in results.values()) and len(results) == 4


def test_batching_wrong_reply_count_names_both_counts():
    completer, results = BatchingCompleter(lambda chats, t, m: ["only one"], wait_s=5.0, max_batch=3), {}
    call_all(completer, [(i, "m", 0.0) for i in range(3)], results)
    assert all(isinstance(e, ValueError) and "1 texts for 3 conversations" in str(e) for e in results.values())


def test_a_lone_caller_does_not_wait_past_the_window():
    completer = BatchingCompleter(echo, wait_s=0.05)
    start = time.perf_counter()
    assert completer([{"role": "user", "content": "alone"}], 0.0, 8) == "alone@0.0"
    assert completer([{"role": "user", "content": "again"}], 0.0, 8) == "again@0.0"
    assert time.perf_counter() - start < 1.0 and (completer.calls, completer.requests) == (2, 2)
    with pytest.raises(ValueError):
        BatchingCompleter(echo, max_batch=0)
