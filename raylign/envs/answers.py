"""Reading answers out of completions and deciding whether two answers agree.

Everything here is pure, never raises on model output, and runs in linear time: completions are
untrusted text from a policy that is being optimised against these very functions, so a 100 KB
reply, a 5000-digit number or a power tower must neither hang a reward actor nor crash it.

Numbers are compared exactly as canonical decimal strings (no float rounding, no int() size limit):
"3.50" == "3.5" == "3.500", "1,234" == "1234". Commas count only as thousands separators, so the
MATH-style list "1,2" is not the number 12. Unicode decimal digits ("４２", "٤٢") read as ASCII.
``math_equal`` first drops LaTeX spacing (``\\!``, ``\\,``, ``\\;``, ``\\:``, ``\\ ``, ``~``, ``{,}`` -> ","): MATH
writes 10080 as ``10,\\!080``, whose ``\\!`` is a negative thin space, not a factorial ("5!" keeps its "!").

``math_equal`` uses math-verify with its signal-based timeouts disabled: SIGALRM only works in the
main thread, and rewards run in worker threads of Ray actors. Inputs that make sympy explode
(nested or huge exponents, factorials, very long answers) are compared as strings instead; the
reward actor's own per-sample timeout is still the last line of defence.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from decimal import Decimal

# A number as it appears in text: 1,234 grouping or plain digits, optional decimals. Every branch
# is deterministic after its first character, so scanning is linear with no backtracking blow-up.
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_SIGNED = re.compile(rf"(?<![\w.])([-+\u2212]?)({_NUM})")
_FINAL = re.compile(r"final\s*[:\uff1a]", re.IGNORECASE)
_NUMBER_AT = re.compile(_NUM)
_DIGITS = re.compile(r"[0-9]*")
_GROUPED = re.compile(r"\d{1,3}(?:,\d{3})+")


def _ascii_digits(text: str) -> str:
    """Map every Unicode decimal digit (fullwidth, Arabic-Indic, ...) to its ASCII digit."""
    if text.isascii():
        return text
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in text).replace("\u2212", "-")


def normalize_number(s: str | None) -> str | None:
    """Canonical decimal string ("-3.50" -> "-3.5", "$1,234." -> "1234", "007" -> "7") or None.

    Tolerates "$", a trailing "." or "%"; anything else that is not a plain decimal number
    (words, fractions, exponents, "1,23") gives None.
    """
    if not isinstance(s, str):
        return None
    t = _ascii_digits(s).replace("$", "").strip().rstrip(".%").strip()
    sign = ""
    if t and t[0] in "+-":
        sign, t = t[0], t[1:].lstrip()
    whole, _, frac = t.partition(".")
    if "," in whole:
        if not _GROUPED.fullmatch(whole):
            return None
        whole = whole.replace(",", "")
    if not (whole or frac) or not _DIGITS.fullmatch(whole) or not _DIGITS.fullmatch(frac):
        return None
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    text = f"{whole}.{frac}" if frac else whole
    return f"-{text}" if sign == "-" and text != "0" else text


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Exact decimal equality of two number strings; anything unreadable is simply not equal."""
    na, nb = normalize_number(a), normalize_number(b)
    # Decimal comparison is exact whatever the context precision, and free of int()'s digit limit.
    return na is not None and nb is not None and Decimal(na) == Decimal(nb)


def extract_final(text: str | None) -> str | None:
    """The number on the LAST "Final:" line (case-insensitive), normalised; None if absent.

    Only the last "Final:" counts, so "Final: 3 ... Final: oops" is None, not 3. Text after the
    Final line (a model that keeps talking) does not prevent extraction: the format prompt asks the
    model not to, but penalising it is the reward's choice, not the parser's.
    """
    if not text:
        return None
    last = None
    for last in _FINAL.finditer(text):
        pass
    if last is None:
        return None
    end = text.find("\n", last.end())
    line = text[last.end(): end if end != -1 else len(text)]
    # Optional markdown bold / currency, a sign, then the number; str.lstrip, not a regex, so a
    # line of 100 KB of spaces cannot backtrack quadratically.
    rest = line.lstrip(" \t*$")
    sign = rest[:1] if rest[:1] in ("-", "+", "\u2212") else ""
    m = _NUMBER_AT.match(rest[len(sign):].lstrip(" \t$"))
    return normalize_number(sign + m.group(0)) if m else None


def extract_last_number(text: str | None) -> str | None:
    """The last number anywhere in the text, normalised (lenient fallback); None if there is none.

    A "-" counts as a sign only when it does not follow a word character, so "10-3" reads 10 and 3.
    """
    if not text:
        return None
    last = None
    for last in _SIGNED.finditer(text):
        pass
    return normalize_number(last.group(1) + last.group(2)) if last else None


def extract_gsm8k_truth(answer: str) -> str | None:
    """The normalised number after the last "####" of a GSM8K solution ("#### 1,200" -> "1200")."""
    head, sep, tail = answer.rpartition("####")
    return normalize_number(tail) if sep else None


def extract_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces kept), else None.

    ``\\boxed 5`` (no braces) reads up to the next space or "$". An unclosed last box gives None.
    """
    if not text:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start == -1:
        return None
    name_end = start + (6 if text.startswith("\\boxed", start) else 5)
    i = name_end
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":
        token = re.match(r"[^\s$]+", text[i: i + 200])
        return token.group(0) if token and i > name_end else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j].strip()
    return None


# LaTeX spacing: \! \, \; \: and "\ " (not after another backslash: "\\" is a line break), and "~".
_SPACING = re.compile(r"(?<!\\)\\[!,;: ]|~")


def _unspace(s: str) -> str:
    """LaTeX spacing removed, so "10,\\!080" reads 10080 and its "\\!" is not taken for a factorial."""
    return _SPACING.sub("", s).replace("{,}", ",").replace("\\$", "$")


def _plain(s: str) -> str:
    """Cosmetic LaTeX removed, for exact string comparison (spacing is already gone: ``_unspace``)."""
    for old, new in (("\\left", ""), ("\\right", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("$", ""), (" ", "")):
        s = s.replace(old, new)
    return s.rstrip(".")


def _too_costly(s: str) -> bool:
    """True for answers that can make sympy run for minutes (power towers, big exponents, n!)."""
    if len(s) > 1000 or "!" in s:
        return True
    s = s.replace("**", "^")
    return any("^" in s[i + 1: i + 16] or re.search(r"\d{4}", s[i + 1: i + 16]) for i, c in enumerate(s) if c == "^")


@functools.lru_cache(maxsize=1)
def _math_verify():
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    return parse, verify


def _verify_equal(pred: str, truth: str) -> bool | None:
    mv = _math_verify()
    if mv is None:
        return None
    parse, verify = mv
    gold = parse(f"${truth.strip('$')}$", parsing_timeout=None)
    guess = parse(f"${pred.strip('$')}$", parsing_timeout=None)
    if not gold or not guess:
        return None
    return bool(verify(gold, guess, timeout_seconds=None))


_SYMPY_TOKENS = re.compile(r"(?:\d+(?:\.\d+)?|sqrt|pi|\*\*|[-+*/()])+")


def _to_sympy_text(s: str) -> str | None:
    """A tiny LaTeX subset (\\frac, \\sqrt, \\pi, ^, \\cdot) as a sympy string; None if outside it."""
    s = _plain(s).replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("^", "**")
    for _ in range(10):
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("{", "(").replace("}", ")")
    s = re.sub(r"(\d|\))(?=[a-z(])", r"\1*", s)
    # Whitelisted tokens only: sympify evaluates strings, and these come from the policy.
    return s if _SYMPY_TOKENS.fullmatch(s) else None


def _sympy_equal(pred: str, truth: str) -> bool | None:
    a, b = _to_sympy_text(pred), _to_sympy_text(truth)
    if a is None or b is None:
        return None
    import sympy

    return bool(sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0)


def math_equal(pred: str | None, truth: str | None) -> bool:
    """Whether a predicted answer equals the ground truth mathematically; never raises.

    Order, after LaTeX spacing is dropped: identical after cosmetic clean-up -> both plain numbers (exact)
    -> math-verify -> sympy simplify(a - b) == 0 on a small LaTeX subset -> cleaned string equality.
    """
    if not pred or not truth:
        return False
    try:
        pred, truth = _unspace(pred), _unspace(truth)
        if _plain(pred) == _plain(truth):
            return True
        if normalize_number(pred) is not None and normalize_number(truth) is not None:
            return numbers_equal(pred, truth)
        if _too_costly(pred) or _too_costly(truth):
            return False
        for judge in (_verify_equal, _sympy_equal):
            try:
                verdict = judge(pred, truth)
            except Exception:
                verdict = None
            if verdict is not None:
                return verdict
        return False
    except Exception:
        return False


def score_reply(completion: str, truth: str, extract, equal, source: str, lenient: bool = False):
    """The shared 1.0 / 0.1 / 0.0 rule: 1.0 right, 0.1 the required format with a wrong answer, 0 no format.

    ``extract`` reads the answer in the env's required format (Final line, \\boxed{}); ``lenient`` falls
    back to the last number, which can earn 1.0 but never the format credit.
    """
    from raylign.types import Score

    prediction = extract(completion)
    info = {"length": len(completion or ""), "source": source if prediction is not None else None}
    if prediction is not None:
        correct = equal(prediction, truth)
        return Score(1.0 if correct else 0.1, correct, prediction, True, info)
    if lenient:
        prediction = extract_last_number(completion)
        correct = equal(prediction, truth)
        info["source"] = "last_number" if prediction is not None else None
        return Score(1.0 if correct else 0.0, correct, prediction, False, info)
    return Score(0.0, False, None, False, info)
