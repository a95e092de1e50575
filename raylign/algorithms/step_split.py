"""Split a response into reasoning steps at token boundaries, for VinePPO's Monte Carlo states.

VinePPO (Kazemnejad et al. 2024, sec. 4) estimates values only at step boundaries, split by simple
heuristics for math (newlines, sentences). ``split_steps`` works on the text each token adds, finds character
cut points with a mode from ``STEP_SPLITTERS``, and moves each cut to the end of the token that contains it
(a token such as ".\\n\\n" or "\\nThe" that holds a cut ends its step). Cuts never fall inside LaTeX math
($...$ with pandoc's rule so "$5 and $3" is money, $$...$$, \\(...\\), \\[...\\]) nor inside numbers ("3.14"
has no whitespace after its point). A sentence end is [.!?] (plus closing quotes, brackets or "$") followed
by whitespace, except after an abbreviation ("e.g.", "i.e.", ...), after "}" (an undelimited "\\frac{1}{2}. ")
and after an enumeration marker at line start ("1. ", "a. "), which belongs to its list item. Whitespace-only
steps join the previous step (the first one joins the next). With more than ``max_steps`` steps, the step with
the fewest tokens is merged into its shorter neighbour (left on ties) until ``max_steps`` remain: boundaries
stay at real step ends and the long steps, which carry most tokens, keep their own values.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable
from itertools import accumulate

_MATH = re.compile(
    r"\$\$.*?\$\$|\\\[.*?\\\]|\\\(.*?\\\)"  # display math and \( \) inline, may span lines
    r"|\$(?!\s)(?:\\.|[^$\n\\])+?(?<!\s)\$(?!\d)",  # $..$: no space inside the dollars, not "$3"
    re.DOTALL,
)
_NEWLINES = re.compile(r"\n(?:[ \t]*\n)*")  # a newline and any blank lines after it
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]$]*(?=\s)")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+\u2022]|\d+[.)]|[A-Za-z][.)]|\(\w{1,3}\))[ \t]", re.MULTILINE)
_ENUM_MARKER = re.compile(r"(?:^|\n)[ \t]*(?:\d+|[A-Za-z])$")  # the line so far is only "12" or "a"
_WORD_BEFORE = re.compile(r"[A-Za-z.]+$")
ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "cf", "approx", "resp", "mr", "mrs", "ms", "dr", "eq", "fig"})


def _newline_cuts(text: str) -> list[int]:
    return [m.end() for m in _NEWLINES.finditer(text)]


def _sentence_cuts(text: str) -> list[int]:
    cuts = []
    for m in _SENTENCE_END.finditer(text):
        before = text[:m.start()]
        word = _WORD_BEFORE.search(before)
        if word and word.group().lower().rstrip(".") in ABBREVIATIONS:
            continue
        if m.group() == "." and before.endswith("}"):
            continue
        if m.group()[0] == "." and _ENUM_MARKER.search(before):
            continue
        cuts.append(m.end())
    return cuts


def _list_item_cuts(text: str) -> list[int]:
    return [m.start() for m in _LIST_ITEM.finditer(text)]


def _auto_cuts(text: str) -> list[int]:
    return _newline_cuts(text) + _sentence_cuts(text) + _list_item_cuts(text)


STEP_SPLITTERS: dict[str, Callable[[str], list[int]]] = {
    "newline": _newline_cuts,
    "sentence": _sentence_cuts,
    "auto": _auto_cuts,
}


def split_steps(pieces: list[str], mode: str, max_steps: int) -> list[int]:
    """Token END index of each step of a response whose token i adds ``pieces[i]``.

    Strictly increasing, the last is len(pieces); [] for an empty response.
    """
    if mode not in STEP_SPLITTERS:
        raise ValueError(f"unknown step split mode {mode!r}; expected one of {sorted(STEP_SPLITTERS)}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not pieces:
        return []
    text = "".join(pieces)
    cuts = _clean_cuts(text, STEP_SPLITTERS[mode](text))
    ends = list(accumulate(len(p) for p in pieces))  # ends[k]: characters up to the end of token k
    # a cut inside token k (or right at its end) ends the step with token k
    boundaries = sorted({bisect_left(ends, c) + 1 for c in cuts} - {len(pieces)}) + [len(pieces)]
    return _merge_shortest(boundaries, max_steps)


def _clean_cuts(text: str, cuts: list[int]) -> list[int]:
    """Sorted cuts strictly inside the text and outside math; whitespace-only steps joined to a neighbour."""
    spans = [m.span() for m in _MATH.finditer(text)]
    inside = {c for c in cuts for a, b in spans if a < c < b}
    kept: list[int] = []
    for c in sorted(set(cuts) - inside):
        if not 0 < c < len(text):
            continue
        if text[kept[-1] if kept else 0:c].strip():
            kept.append(c)
        elif kept:
            kept[-1] = c  # whitespace after a step stays with that step
    if kept and not text[kept[-1]:].strip():
        kept.pop()
    return kept


def _merge_shortest(boundaries: list[int], max_steps: int) -> list[int]:
    ends = list(boundaries)
    while len(ends) > max_steps:
        lengths = [e - s for s, e in zip([0] + ends[:-1], ends)]
        k = lengths.index(min(lengths))
        if k == len(ends) - 1 or (k > 0 and lengths[k - 1] <= lengths[k + 1]):
            del ends[k - 1]  # join step k to the step before it
        else:
            del ends[k]  # join step k to the step after it
    return ends
