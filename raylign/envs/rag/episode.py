"""Multi-turn search episodes: the policy searches, reads results and answers, in batched turns.

Turn 1 samples ``n`` trajectories per prompt; each later turn continues every live trajectory with
``n=1``. A turn is ONE ``generate`` call over all live trajectories (stopping at ``</search>`` /
``</answer>``) and ONE ``search`` call over all their queries. A turn ends the episode when it
answers, stops without a closing tag (EOS: an untagged final attempt, a format failure), is cut at
``turn_max_new_tokens`` (finish_reason "length"), or is the last of ``cfg.max_turns``. Otherwise the
tool output ``"\\n" + format_results(...) + "\\n"`` (or ``format_error`` for a malformed call, which
never raises) is tokenized and spliced in with loss_mask 0 and logprob 0.0. The tool output that the
second-to-last turn gets carries LAST_TURN_NOTE inside its result block: no searches left, answer now.

Generated token ids are kept exactly (never re-tokenized); turn texts are cut right after the first
closing tag (see ``tools.cut_at_stop``) so the reward can split the text back into turns exactly.
Context limit (deviation from "truncate mid-turn"): a turn starts only if its full
``turn_max_new_tokens`` fits in ``max_model_len``, and tool output is appended only if it and the next
turn fit; otherwise the episode ends there with finish_reason "length". No sequence ever exceeds
``max_model_len`` and no partial tool output is ever shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from raylign.config import RagConfig
from raylign.envs.rag.tools import (
    ANSWER, SEARCH, STOPS, block_doc_ids, cut_at_stop, format_error, format_results, parse_action,
)
from raylign.types import Completion

LAST_TURN_NOTE = "No searches left. Reply now with <answer>...</answer>."

Generate = Callable[[list[list[int]], int, float, int, tuple[str, ...]], list[list[Completion]]]
Search = Callable[[list[str], int], list[list[Any]]]


@dataclass
class _Trajectory:
    prompt_ids: list[int]
    replica: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    retrieved: list[list[str]] = field(default_factory=list)
    tool_errors: int = 0
    tool_spans: list[list[int]] = field(default_factory=list)  # [start, end) of each tool output in the text
    answer: str | None = None
    finish_reason: str | None = None  # set when the episode is over

    def context(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    def to_completion(self) -> Completion:
        info = {"turns": len(self.versions), "searches": self.searches, "retrieved": self.retrieved,
                "tool_errors": self.tool_errors, "answer": self.answer, "tool_spans": self.tool_spans}
        return Completion(self.prompt_ids, self.token_ids, "".join(self.texts), self.logprobs,
                          self.finish_reason or "stop", min(self.versions, default=0), self.replica,
                          self.loss_mask, info)


def _add_model_turn(traj: _Trajectory, out: Completion) -> tuple[str, bool]:
    """Append a generated turn (exact ids, mask 1); its text cut at the closing tag, and whether it had one."""
    if len(out.logprobs) != len(out.token_ids):
        raise ValueError(f"generate returned {len(out.logprobs)} logprobs for {len(out.token_ids)} tokens")
    text, tagged = cut_at_stop(out.text)
    traj.token_ids += out.token_ids
    traj.logprobs += out.logprobs
    traj.loss_mask += [1] * len(out.token_ids)
    traj.texts.append(text)
    traj.versions.append(out.policy_version)
    if not tagged:
        traj.finish_reason = "length" if out.finish_reason == "length" else "stop"
    return text, tagged


def _decide(traj: _Trajectory, out: Completion, last_turn: bool, cfg: RagConfig) -> tuple[str, str] | None:
    """Take one turn; the tool call to serve next ("search", query) / ("error", msg), or None if over."""
    text, tagged = _add_model_turn(traj, out)
    if not tagged:
        return None
    action = parse_action(text, cfg.max_query_chars)
    if action.kind == ANSWER:
        traj.answer, traj.finish_reason = action.payload, "stop"
        return None
    traj.tool_errors += action.kind == "error"
    if last_turn:  # a search or a malformed call in the last turn: no answer
        traj.finish_reason = "stop"
        return None
    return (SEARCH, action.payload) if action.kind == SEARCH else ("error", action.error)


def _add_tool_output(traj: _Trajectory, block: str, tokenizer, room_needed: int, max_model_len: int) -> bool:
    """Splice ``"\\n" + block + "\\n"`` in (mask 0, logprob 0.0) if it and the next turn fit; else end."""
    text = "\n" + block + "\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(traj.context()) + len(ids) + room_needed > max_model_len:
        traj.finish_reason = "length"
        return False
    traj.token_ids += ids
    traj.logprobs += [0.0] * len(ids)
    traj.loss_mask += [0] * len(ids)
    start = sum(map(len, traj.texts))
    traj.tool_spans.append([start, start + len(text)])
    traj.texts.append(text)
    return True


def _serve_tools(calls: list[tuple[_Trajectory, tuple[str, str]]], search: Search, tokenizer, cfg: RagConfig,
                 max_model_len: int, note: str) -> None:
    """One batched search for every query of the turn, then each trajectory's tool output."""
    queries = [payload for _, (kind, payload) in calls if kind == SEARCH]
    hits_Q = iter(search(queries, cfg.top_k) if queries else [])
    for traj, (kind, payload) in calls:
        if kind == SEARCH:
            block = format_results(next(hits_Q), cfg.max_result_chars, note)
            if _add_tool_output(traj, block, tokenizer, cfg.turn_max_new_tokens, max_model_len):
                traj.searches.append(payload)
                traj.retrieved.append(block_doc_ids(block))
        else:
            _add_tool_output(traj, format_error(payload, note), tokenizer, cfg.turn_max_new_tokens, max_model_len)


def run_episodes(prompt_ids: list[list[int]], n: int, temperature: float, generate: Generate, search: Search,
                 tokenizer, cfg: RagConfig, max_model_len: int) -> list[list[Completion]]:
    """``n`` search-agent trajectories per prompt, one Completion each (see the module docstring).

    ``generate`` returns, per context, n Completions holding only the new tokens, with the stop string
    INCLUDED in ``text`` when one was hit (vLLM: ``include_stop_str_in_output=True``); without it every
    tool call would read as an untagged EOS. ``info["retrieved"]`` holds marker ids (``tools.marker_id``).
    """
    room = cfg.turn_max_new_tokens
    groups = [[_Trajectory(list(p)) for _ in range(n)] for p in prompt_ids]
    for group in groups:
        if len(group[0].prompt_ids) + room > max_model_len:
            for traj in group:
                traj.finish_reason = "length"
    for turn in range(1, cfg.max_turns + 1):
        if turn == 1:
            live_groups = [g for g in groups if g[0].finish_reason is None]
            outs = generate([g[0].prompt_ids for g in live_groups], n, temperature, room, STOPS) if live_groups else []
            pairs = [(traj, out) for g, outs_n in zip(live_groups, outs, strict=True)
                     for traj, out in zip(g, outs_n, strict=True)]
            for traj, out in pairs:
                traj.replica = out.replica
        else:
            live = [t for g in groups for t in g if t.finish_reason is None]
            if not live:
                break
            outs = generate([t.context() for t in live], 1, temperature, room, STOPS)
            pairs = [(traj, outs_1[0]) for traj, outs_1 in zip(live, outs, strict=True)]
        calls = [(traj, call) for traj, out in pairs
                 if (call := _decide(traj, out, turn == cfg.max_turns, cfg)) is not None]
        note = LAST_TURN_NOTE if turn == cfg.max_turns - 1 else ""
        _serve_tools(calls, search, tokenizer, cfg, max_model_len, note)
    return [[traj.to_completion() for traj in group] for group in groups]
