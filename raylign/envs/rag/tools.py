"""One model turn of the search agent: read the tool call, write the tool's reply.

The policy writes ``<search>query</search>`` or ``<answer>text</answer>``; reasoning before the tag is
fine. Rule (the same in the episode and in the reward): the FIRST closing tag in the turn decides, and
its element runs from the first opening tag of either kind; a mismatch (``<search>..</answer>``), a tag
inside the payload (nesting), an unclosed tag, an empty payload or a query over ``max_query_chars`` is an
error whose message goes back to the policy. With the generator stopping at the closing tags, the first
closing tag is where the turn ends, so "the first complete tag wins".

Tool output is the only text the env writes into a trajectory, and the reward reads retrieved doc ids
back from it, so document text is neutralised: ``<``/``>`` become ``&lt;``/``&gt;`` (no forged
``</result>`` or ``<answer>``) and whitespace runs, newlines included, become one space, so the only line
starts inside a result block are the ``[doc_id]`` markers written here (a ``[`` in a document can never
start a line). Doc ids are reduced to ``[A-Za-z0-9_.:/#-]`` (``marker_id``); compare gold ids the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SEARCH, ANSWER = "search", "answer"
STOPS: tuple[str, ...] = ("</search>", "</answer>")
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
_TAG = re.compile(r"</?(search|answer)>")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_.:/#-]")
_SPACE = re.compile(r"\s+")
NO_CALL = "no tool call: write <search>query</search> or <answer>text</answer>"


@dataclass(frozen=True)
class Action:
    """What one turn asked for: kind "search"/"answer" with its payload, or "error" with a message."""

    kind: str
    payload: str = ""
    error: str = ""


def _error(msg: str) -> Action:
    return Action("error", error=msg)


def parse_action(text: str, max_query_chars: int) -> Action:
    """The tool call of one turn (see the module docstring for the rule); never raises."""
    tags = list(_TAG.finditer(text or ""))
    close = next((m for m in tags if m.group(0).startswith("</")), None)
    first = tags[0] if tags else None
    if close is None:
        return _error(f"missing closing tag </{first.group(1)}>" if first else NO_CALL)
    kind = close.group(1)
    if first is close:
        return _error(f"</{kind}> without <{kind}>")
    if first.group(1) != kind:
        return _error(f"<{first.group(1)}> closed by </{kind}>")
    if any(m.start() < close.start() for m in tags[1:]):
        return _error(f"nested tags inside <{kind}>")
    payload = text[first.end():close.start()].strip()
    if not payload:
        return _error(f"empty {'query' if kind == SEARCH else 'answer'}")
    if kind == SEARCH and len(payload) > max_query_chars:
        return _error(f"query longer than {max_query_chars} characters")
    return Action(kind, payload)


def neutralise(text: str) -> str:
    """Untrusted text made safe inside a result block: no tags, one line."""
    return _SPACE.sub(" ", str(text)).strip().replace("<", "&lt;").replace(">", "&gt;")


def marker_id(doc_id: Any) -> str:
    """A doc id as written in a ``[doc_id]`` marker (and as the reward compares it)."""
    return _UNSAFE_ID.sub("_", str(doc_id)) or "_"


def _block(lines: list[str], note: str) -> str:
    body = "".join(line + "\n" for line in lines)
    return f"{RESULT_OPEN}\n{body}{note + chr(10) if note else ''}{RESULT_CLOSE}"


def format_results(hits: list[Any], max_chars: int, note: str = "") -> str:
    """``<result>\\n[doc_id] text\\n...</result>``, cut to ``max_chars`` (``note`` is trusted and not counted).

    ``hits`` are any objects with ``doc_id`` and ``text``. The last line that does not fit is cut; a line
    whose marker does not fit whole is dropped, so every marker in the block is complete.
    """
    budget = max_chars - len(RESULT_OPEN) - len(RESULT_CLOSE) - 1
    lines = []
    for hit in hits:
        marker = f"[{marker_id(hit.doc_id)}] "
        line = marker + neutralise(hit.text)
        if len(line) + 1 > budget:
            if budget - 1 > len(marker):
                lines.append(line[:budget - 1])
            break
        lines.append(line)
        budget -= len(line) + 1
    return _block(lines or ["(no results)"], note)


def format_error(msg: str, note: str = "") -> str:
    """``<result>error: msg</result>`` with the message neutralised (it may quote the policy)."""
    inner = f"error: {neutralise(msg)}"
    return f"{RESULT_OPEN}{inner}{chr(10) + note + chr(10) if note else ''}{RESULT_CLOSE}"


def cut_at_stop(text: str) -> tuple[str, bool]:
    """Text up to and including the first closing tag, and whether there was one.

    Generators stop at the first closing tag; a backend whose text runs a few characters past it (the
    rest of the last token) is cut here so turn boundaries in the trajectory text are exact.
    """
    ends = [i + len(s) for s in STOPS if (i := text.find(s)) != -1]
    return (text[:min(ends)], True) if ends else (text, False)


_MARKER = re.compile(r"^\[([A-Za-z0-9_.:/#-]+)\] ", re.MULTILINE)


def block_doc_ids(block: str) -> list[str]:
    """Doc ids of the ``[doc_id]`` line markers of one result block, in order (call on env blocks only)."""
    return _MARKER.findall(block)


@dataclass(frozen=True)
class Turn:
    """One policy turn read back from a trajectory's text, and the tool block the env answered with."""

    text: str
    closed: bool  # ended at a closing tag (else EOS, a cut, or the episode's last words)
    tool: str | None  # "<result>...</result>" the env spliced in after it; None: nothing followed


def split_turns(text: str) -> list[Turn]:
    """Undo ``run_episodes``' concatenation: policy turns and the env's tool blocks, exactly.

    A policy turn ends at its first closing tag (the generator's stop), and only there can the env's
    ``"\\n<result>"`` follow; a result block ends at its first ``</result>`` because everything inside is
    neutralised. Text the policy writes that merely looks like a result block stays policy text.
    """
    turns, pos = [], 0
    while pos < len(text):
        head, closed = cut_at_stop(text[pos:])
        pos += len(head)
        tool = None
        close = text.find(RESULT_CLOSE, pos) if closed and text.startswith("\n" + RESULT_OPEN, pos) else -1
        if close != -1:
            tool = text[pos + 1:close + len(RESULT_CLOSE)]
            pos = close + len(RESULT_CLOSE) + text.startswith("\n", close + len(RESULT_CLOSE))
        turns.append(Turn(head, closed, tool))
    return turns
