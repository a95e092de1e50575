"""How DSPy reaches a task model served elsewhere: a batching completer and a DSPy 3.4 custom engine.

DSPy runs a program one example per thread, and each predictor asks its LM for one completion at a time.
The task model lives in a generator pool that is fast only on batches, so ``BatchingCompleter`` gathers
the single requests of many threads into one ``Complete`` call per (temperature, max_tokens): the first
request of a batch leads it, waits up to ``wait_s`` for others (or until ``max_batch`` are queued), sends
the batch and hands each thread its own reply. ``CompleterEngine`` is the non-deprecated DSPy 3.4 way to
plug that into ``dspy.LM`` (``engine=`` with ``complete(Request) -> Response``; dspy.clients.engines.base),
and ``make_lm`` builds the LM. ``Complete`` is supplied by the caller (the Ray side) and owns the deadline:
a thread here waits as long as the ``Complete`` call it rides on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import dspy
from dspy.clients.engines.base import validate_request
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

Chat = list[dict[str, str]]
# A batch of chat conversations, temperature, max_tokens -> one reply text per conversation, in order.
Complete = Callable[[list[Chat], float, int], list[str]]
# One conversation, temperature, max_tokens -> its reply (a BatchingCompleter, or a plain function).
Completer = Callable[[Chat, float, int], str]


@dataclass
class _Batch:
    """Requests with one (temperature, max_tokens), each with the future its thread waits on."""

    chats: list[Chat] = field(default_factory=list)
    futures: list[Future] = field(default_factory=list)


class BatchingCompleter:
    """Thread-safe ``Completer`` that sends requests arriving together as one ``Complete`` call.

    The first request for a key leads its batch: it waits (on a condition, not spinning) up to ``wait_s``
    or until ``max_batch`` requests are queued, closes the batch, calls ``complete`` outside the lock and
    resolves every request's future. Later requests only wait on their future, so a lone caller is its own
    leader and returns after ``wait_s``. An exception from ``complete`` is raised in every thread of the
    batch; a wrong number of replies is a ValueError naming both counts. ``calls`` counts ``complete``
    calls and ``requests`` the conversations sent.
    """

    def __init__(self, complete: Complete, wait_s: float = 0.005, max_batch: int = 64):
        if wait_s < 0 or max_batch < 1:
            raise ValueError(f"need wait_s >= 0 and max_batch >= 1, got {wait_s} and {max_batch}")
        self.complete, self.wait_s, self.max_batch = complete, wait_s, max_batch
        self.calls = self.requests = 0
        self._cond = threading.Condition()
        self._open: dict[tuple[float, int], _Batch] = {}

    def __call__(self, messages: Chat, temperature: float, max_tokens: int) -> str:
        key = (float(temperature), int(max_tokens))
        future: Future = Future()
        with self._cond:
            batch = self._open.get(key)
            leader = batch is None
            if leader:
                batch = self._open[key] = _Batch()
            batch.chats.append(messages)
            batch.futures.append(future)
            if len(batch.chats) >= self.max_batch:
                del self._open[key]
                self._cond.notify_all()
            if leader:
                self._cond.wait_for(lambda: self._open.get(key) is not batch, timeout=self.wait_s)
                if self._open.get(key) is batch:
                    del self._open[key]
                self.calls += 1
                self.requests += len(batch.chats)
        if leader:
            self._send(batch, *key)
        return future.result()

    def _send(self, batch: _Batch, temperature: float, max_tokens: int) -> None:
        try:
            texts = self.complete(batch.chats, temperature, max_tokens)
            if len(texts) != len(batch.chats):
                raise ValueError(f"Complete returned {len(texts)} texts for {len(batch.chats)} conversations")
        except BaseException as err:  # every waiting thread must wake, whatever stopped the call
            for future in batch.futures:
                future.set_exception(err)
            return
        for future, text in zip(batch.futures, texts):
            future.set_result(text)


def _text(parts, where: str) -> str:
    """A message's text parts joined by newlines (as lm15's ``Message.text``); the task model reads text
    only, so any other part is an error rather than silently dropped."""
    if any(not isinstance(p, TextPart) for p in parts):
        kinds = sorted({getattr(p, "type", type(p).__name__) for p in parts})
        raise ValueError(f"{where} has non-text parts {kinds}; the task model takes text only")
    return "\n".join(p.text for p in parts)


def chat_messages(request: Request) -> Chat:
    """``request.system`` and ``request.messages`` as OpenAI-style ``{"role", "content"}`` dicts."""
    chat = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else _text(request.system, "system")
        chat.append({"role": "system", "content": system})
    chat.extend({"role": m.role, "content": _text(m.parts, f"a {m.role} message")} for m in request.messages)
    return chat


class CompleterEngine:
    """DSPy 3.4 custom engine over a ``Completer``: one request, one reply text, no provider SDK.

    Temperature and max_tokens come from the request's config (DSPy fills them from the LM's kwargs and
    per-call overrides), else from the defaults given here. The reply is reported as ``finish_reason
    "stop"`` with unknown token usage: ``Complete`` returns text only.
    """

    def __init__(self, completer: Completer, temperature: float, max_tokens: int):
        self.completer, self.temperature, self.max_tokens = completer, temperature, max_tokens

    def complete(self, request: Request) -> Response:
        validate_request(request)
        config = request.config
        temperature = self.temperature if config.temperature is None else config.temperature
        max_tokens = self.max_tokens if config.max_tokens is None else config.max_tokens
        text = self.completer(chat_messages(request), temperature, max_tokens)
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage())

    def stream(self, request: Request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def make_lm(completer: Completer, model_name: str, temperature: float, max_tokens: int) -> dspy.LM:
    """A ``dspy.LM`` whose every call goes through ``completer``.

    DSPy's cache is off: the task model is frozen, so a cached reply would be the right text, but the
    reward's timing and the per-episode LM call counts must be what the generator pool really served.
    DSPy's retries are off too (``num_retries=0``): ``Complete`` owns deadlines and failures for a whole
    batch, and a retry per thread would re-send work and break the counts.
    """
    engine = CompleterEngine(completer, temperature, max_tokens)
    return dspy.LM(model_name, engine=engine, cache=False, num_retries=0,
                   temperature=temperature, max_tokens=max_tokens)
