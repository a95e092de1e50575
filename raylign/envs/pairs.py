"""Offline training data: SFT examples and preference pairs, loaded from files or generated from arith.

Files are read with :func:`raylign.envs.data.load_records` (local jsonl/json/parquet, ``{split}`` in the
path, or a hub id) in the row formats TRL users have (see :func:`load_examples` and :func:`load_pairs`).
Loading fails with a :class:`DataError` on structure (a missing key, a wrong type, a row that is not an
object), naming ``file:row: field``; :func:`validate_pairs` / :func:`validate_examples` then report content
issues (empty texts, bad step scores, too long) row by row as :class:`RowIssue` s, so one bad row can be
dropped instead of a whole file. Rows are 0-based record indices, as in data.py.

Step scores (stepwise DPO) hold one score per step, a step being a non-empty line of the response, or one
per response token; :func:`step_spans` and :func:`token_scores` spread per-step scores over tokens.
:func:`arith_examples` / :func:`arith_pairs` (re-exported from ``arith_solutions``) generate worked arithmetic solutions, one step per line,
from the arith env's own problems, so SFT and DPO run offline with no files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from raylign.chat import encode_chat
from raylign.config import DatasetConfig
from raylign.envs.data import DataError, load_records
from raylign.types import Example, Pair
from raylign.envs.arith_solutions import arith_examples, arith_pairs  # noqa: F401 - re-exported

Messages = list[dict[str, str]]


# ---- loading -------------------------------------------------------------------------------------------

def _error(src: str, row: int, name: str, reason: str) -> DataError:
    return DataError(f"{src}:{row}: {name}: {reason}")


def _fields(record: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k, v in record.items() if v is not None))


def _first_non_object(path: Path) -> tuple[int, str] | None:
    """(row, type name) of the first record of a valid JSON/JSONL file that is not an object, else None."""
    try:
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except (OSError, ValueError):
        return None
    for row, value in enumerate(rows if isinstance(rows, list) else []):
        if not isinstance(value, dict):
            return row, type(value).__name__
    return None


def _records(path: str, split: str, limit: int | None) -> tuple[list[dict[str, Any]], str]:
    try:
        return load_records(DatasetConfig(path=path, split=split, limit=limit))
    except DataError as e:
        # datasets' own error for a row that is not an object names no row; find it for the user.
        local = Path(path.replace("{split}", split)).expanduser()
        bad = _first_non_object(local) if local.suffix in (".json", ".jsonl") and local.is_file() else None
        if bad is None:  # the same error, naming the field these files come from
            raise DataError(str(e).replace("(dataset.path)", "(algorithm.data_path)")) from None
        raise _error(str(local), bad[0], "row", f"expected an object, got {bad[1]}") from None


def _messages(value: Any, src: str, row: int, name: str) -> Messages:
    if not isinstance(value, list):
        raise _error(src, row, name, f"expected a list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            got = type(message).__name__
            raise _error(src, row, f"{name}[{i}]", f"expected a message {{role, content}}, got {got}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if message.get(key) is None else f"expected a string, got {type(message[key]).__name__}"
                raise _error(src, row, f"{name}[{i}].{key}", got)
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _prompt(value: Any, src: str, row: int) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _messages(value, src, row, "prompt")


def _response(value: Any, src: str, row: int, name: str) -> str:
    """A string, or (conversational format) a list holding exactly one assistant message."""
    if isinstance(value, str):
        return value
    messages = _messages(value, src, row, name)
    if [m["role"] for m in messages] != ["assistant"]:
        raise _error(src, row, name, f"expected one assistant message, got roles {[m['role'] for m in messages]}")
    return messages[0]["content"]


def _split_last(messages: Messages, src: str, row: int, name: str) -> tuple[Messages, str]:
    """A full conversation as (the messages before the last, the last one's content): it must be the assistant's."""
    if not messages or messages[-1]["role"] != "assistant":
        got = f"role {messages[-1]['role']!r}" if messages else "no messages"
        raise _error(src, row, name, f"the last message must be the assistant's response, got {got}")
    return messages[:-1], messages[-1]["content"]


def _with_system(record: dict[str, Any], prompt: Messages, src: str, row: int) -> Messages:
    system = record.get("system")
    if system is None:
        return prompt
    if not isinstance(system, str):
        raise _error(src, row, "system", f"expected a string, got {type(system).__name__}")
    if prompt and prompt[0]["role"] == "system":
        raise _error(src, row, "system", "given twice: as the system key and as the prompt's first message")
    return [{"role": "system", "content": system}, *prompt]


def _require(record: dict[str, Any], key: str, src: str, row: int, expected: str) -> Any:
    if record.get(key) is None:
        raise _error(src, row, key, f"missing (fields: {_fields(record)}); expected {expected}")
    return record[key]


def _example(record: dict[str, Any], src: str, row: int) -> tuple[Messages, str]:
    expected = "prompt + completion, prompt + response, or messages"
    if record.get("prompt") is None and record.get("messages") is not None:
        prompt, response = _split_last(_messages(record["messages"], src, row, "messages"), src, row, "messages")
    else:
        prompt = _prompt(_require(record, "prompt", src, row, expected), src, row)
        if record.get("completion") is not None and record.get("response") is not None:
            raise _error(src, row, "response", "given together with completion; keep one")
        key = "response" if record.get("response") is not None else "completion"
        response = _response(_require(record, key, src, row, expected), src, row, key)
    return _with_system(record, prompt, src, row), response


def _scores(record: dict[str, Any], key: str, src: str, row: int) -> tuple[float, ...] | None:
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise _error(src, row, key, f"expected a list of numbers, got {type(value).__name__}")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise _error(src, row, f"{key}[{i}]", f"expected a number, got {type(x).__name__}")
    return tuple(float(x) for x in value)


def _pair(record: dict[str, Any], src: str, row: int) -> tuple[Messages, str, str]:
    expected = "prompt + chosen + rejected, or chosen + rejected conversations sharing a prompt"
    chosen = _require(record, "chosen", src, row, expected)
    rejected = _require(record, "rejected", src, row, expected)
    if record.get("prompt") is not None:
        prompt = _prompt(record["prompt"], src, row)
        chosen, rejected = _response(chosen, src, row, "chosen"), _response(rejected, src, row, "rejected")
    else:  # implicit prompt: the messages both conversations share before their final answers
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise _error(src, row, "prompt", "missing; without a prompt, chosen and rejected must be message lists")
        prompt, chosen = _split_last(_messages(chosen, src, row, "chosen"), src, row, "chosen")
        rest, rejected = _split_last(_messages(rejected, src, row, "rejected"), src, row, "rejected")
        if rest != prompt:
            at = next((i for i, (a, b) in enumerate(zip(prompt, rest)) if a != b), min(len(prompt), len(rest)))
            raise _error(src, row, "rejected", f"differs from chosen at message {at}, before the final assistant "
                                               "message (an implicit prompt is what both share)")
    return _with_system(record, prompt, src, row), chosen, rejected


def _stem(source: str) -> str:
    return Path(source).stem or source


def load_examples(path: str, split: str = "train", limit: int | None = None) -> list[Example]:
    """SFT examples from a jsonl/json/parquet file or hub id; ``{split}`` in ``path`` is filled with ``split``.

    Rows: ``{prompt, completion}`` or ``{prompt, response}`` (strings, or a message-list prompt with a
    one-assistant-message completion), or ``{messages}`` whose last message (the assistant's) is the
    response. A string prompt is one user message; an optional ``system`` string is prepended.
    """
    records, src = _records(path, split, limit)
    out = []
    for row, record in enumerate(records):
        prompt, response = _example(record, src, row)
        out.append(Example(f"{_stem(src)}-{split}-{row}", prompt, response, f"{src}:{row}"))
    return out


def load_pairs(path: str, split: str = "train", limit: int | None = None) -> list[Pair]:
    """Preference pairs, as :func:`load_examples` reads files.

    Rows: ``{prompt, chosen, rejected}`` with strings or TRL's conversational lists (chosen/rejected one
    assistant message each), or ``{chosen, rejected}`` full conversations whose shared messages are the
    prompt. Optional ``system`` string, ``scores_chosen`` / ``scores_rejected`` lists of numbers, and
    ``answer`` (the ground truth, for Monte Carlo step scores).
    """
    records, src = _records(path, split, limit)
    out = []
    for row, record in enumerate(records):
        prompt, chosen, rejected = _pair(record, src, row)
        scores = [_scores(record, key, src, row) for key in ("scores_chosen", "scores_rejected")]
        answer = record.get("answer")
        out.append(Pair(f"{_stem(src)}-{split}-{row}", prompt, chosen, rejected, *scores, source=f"{src}:{row}",
                        answer=None if answer is None else str(answer)))
    return out


# ---- tokens and steps ----------------------------------------------------------------------------------

def encode_response(tokenizer: Any, response: str) -> list[int]:
    """The response's token ids as the generator produced them: the text's ids, then the end-of-turn token.

    A generated reply stops on EOS and the chat template closes each assistant turn with that same token
    (SmolLM2's eos is ``<|im_end|>``), so training on it teaches the model when to stop.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id to end the response with")
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def response_char_ends(tokenizer: Any, response: str) -> list[int]:
    """For each id of :func:`encode_response`, the character offset where that token ends in ``response``."""
    offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [end for _, end in offsets] + [len(response)]


def step_spans(response: str, delimiter: str = "\n") -> list[tuple[int, int]]:
    """(start, end) character spans of the response's steps, its non-empty pieces split on ``delimiter``.

    A step includes its trailing delimiter; blank pieces join the step before them (leading ones the
    first step), so the spans tile the whole response and every character has a step.
    """
    if not delimiter:
        raise ValueError("step delimiter must be non-empty")
    starts, pos = [], 0
    while pos < len(response):
        end = response.find(delimiter, pos)
        end = len(response) if end == -1 else end
        if response[pos:end].strip():
            starts.append(pos)
        pos = end + len(delimiter)
    if not starts:
        return []
    return list(zip([0, *starts[1:]], [*starts[1:], len(response)]))


def token_scores(scores: Sequence[float], n_tokens: int, token_char_ends: Sequence[int],
                 spans: Sequence[tuple[int, int]]) -> list[float]:
    """One score per token: ``scores`` itself when it has ``n_tokens`` entries, else one per step of ``spans``.

    Token t gets the score of the step holding its last character (``token_char_ends[t] - 1``); a token
    with no characters (end 0, or EOS at the end) falls in the first or last step.
    """
    if len(token_char_ends) != n_tokens:
        raise ValueError(f"{len(token_char_ends)} token end offsets for {n_tokens} tokens")
    if len(scores) == n_tokens:
        return [float(s) for s in scores]
    if len(scores) != len(spans):
        raise ValueError(f"{len(scores)} scores, but {len(spans)} steps and {n_tokens} tokens")
    stops = [end for _, end in spans]
    return [float(scores[min(bisect_right(stops, end - 1), len(spans) - 1)]) for end in token_char_ends]


# ---- validation ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RowIssue:
    """A content problem of one loaded row: where (``file:row``), which field, and what is wrong."""

    source: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.reason}"


def _empty(messages: Messages) -> bool:
    return not any(m["content"].strip() for m in messages)


def _too_long(tokenizer: Any, max_len: int | None, prompt: Messages, response_ids: list[int]) -> str | None:
    if tokenizer is None or max_len is None or _empty(prompt):
        return None
    total = len(encode_chat(tokenizer, prompt)) + len(response_ids)
    return f"prompt + response is {total} tokens, over max_len {max_len}" if total > max_len else None


def _score_issues(name: str, scores: tuple[float, ...], response: str, ids: list[int] | None,
                  delimiter: str) -> list[tuple[str, str]]:
    out = []
    bad = [s for s in scores if not (math.isfinite(s) and 0.0 <= s <= 1.0)]
    if bad:
        out.append((name, f"{len(bad)} score(s) not finite or outside [0, 1], first {bad[0]}"))
    n_steps = len(step_spans(response, delimiter))
    if len(scores) != n_steps and (ids is None or len(scores) != len(ids)):
        tokens = f" nor its {len(ids)} tokens" if ids is not None else ""
        out.append((name, f"{len(scores)} scores match neither the response's {n_steps} steps{tokens}"))
    return out


def _pair_issues(pair: Pair, tokenizer: Any, max_len: int | None, delimiter: str) -> list[tuple[str, str]]:
    out = [("prompt", "empty")] if _empty(pair.prompt) else []
    texts = {"chosen": pair.chosen, "rejected": pair.rejected}
    out += [(name, "empty") for name, text in texts.items() if not text.strip()]
    if pair.chosen.strip() and pair.chosen == pair.rejected:
        out.append(("rejected", "identical to chosen"))
    ids = {name: encode_response(tokenizer, text) for name, text in texts.items()} if tokenizer is not None else {}
    scores = {"chosen": pair.scores_chosen, "rejected": pair.scores_rejected}
    for name, other in (("chosen", "rejected"), ("rejected", "chosen")):
        if scores[name] is None and scores[other] is not None:
            out.append((f"scores_{name}", f"missing while scores_{other} is given (give both or neither)"))
        elif scores[name] is not None:
            out += _score_issues(f"scores_{name}", scores[name], texts[name], ids.get(name), delimiter)
    if ids:
        longer = max(ids, key=lambda name: len(ids[name]))
        reason = _too_long(tokenizer, max_len, pair.prompt, ids[longer])
        out += [(longer, reason)] if reason else []
    return out


def validate_pairs(pairs: Iterable[Pair], tokenizer: Any = None, max_len: int | None = None,
                   step_delimiter: str = "\n") -> list[RowIssue]:
    """Content issues of loaded pairs, row by row; an empty list means every pair is usable.

    Checks: empty prompt / chosen / rejected; chosen == rejected; only one score vector; scores not finite
    or outside [0, 1]; a score count matching neither the steps nor (with a tokenizer) the response tokens
    of :func:`encode_response`; and (with tokenizer and max_len) prompt + the longer response too long.
    """
    return [RowIssue(p.source or p.id, name, reason)
            for p in pairs for name, reason in _pair_issues(p, tokenizer, max_len, step_delimiter)]


def validate_examples(examples: Iterable[Example], tokenizer: Any = None, max_len: int | None = None) -> list[RowIssue]:
    """Content issues of loaded SFT examples: empty prompt or response, prompt + response over max_len."""
    issues = []
    for ex in examples:
        where = ex.source or ex.id
        issues += [RowIssue(where, "prompt", "empty")] if _empty(ex.prompt) else []
        issues += [RowIssue(where, "response", "empty")] if not ex.response.strip() else []
        if tokenizer is not None:
            reason = _too_long(tokenizer, max_len, ex.prompt, encode_response(tokenizer, ex.response))
            issues += [RowIssue(where, "response", reason)] if reason else []
    return issues


# ---- writing -------------------------------------------------------------------------------------------

def write_jsonl(records: Iterable[Any], path: str | Path) -> str:
    """Write dicts or dataclass records (Example, Pair) one JSON object a line; returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in records)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def pairs_to_rows(pairs: Iterable[Pair]) -> list[dict[str, Messages]]:
    """TRL's conversational preference rows: a message-list prompt, one assistant message per response."""
    return [{"prompt": [dict(m) for m in p.prompt],
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
