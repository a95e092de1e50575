"""Answer extraction and equivalence under adversarial completions (the policy is optimised against these)."""

from __future__ import annotations

import threading
import time

import pytest

from raylign.envs.answers import (
    extract_boxed,
    extract_final,
    extract_gsm8k_truth,
    extract_last_number,
    math_equal,
    normalize_number,
    numbers_equal,
)
from raylign.envs.gsm8k import score_final
from raylign.envs.math_competition import score_boxed


@pytest.mark.parametrize("text, expected", [
    ("Final: 1,234", "1234"),
    ("final: -3.50", "-3.5"),
    ("FINAL: 7", "7"),
    ("Reasoning...\nFinal: 42\nI hope this helps!", "42"),   # text after the Final line still extracts
    ("Final: 1\nwait, no\nFinal: 2", "2"),                     # the last Final line counts
    ("Final: 2\nFinal: oops", None),                           # ...even when it has no number
    ("Final: ４２", "42"),                                      # fullwidth digits
    ("Final: ٤٢", "42"),                                        # Arabic-Indic digits
    ("Final: $18.", "18"),
    ("**Final:** 12 apples", "12"),
    ("Final: \u22125", "-5"),                                   # Unicode minus sign
    ("", None),
    ("Final:", None),
    ("Final: the answer is unclear", None),
    ("The answer is 12.", None),                               # no Final line at all
])
def test_extract_final(text, expected):
    assert extract_final(text) == expected


def test_huge_number_is_fast_and_exact():
    big = "9" * 5000
    start = time.perf_counter()
    assert extract_final(f"Final: {big}") == big
    assert numbers_equal(big, big + ".000")
    assert not numbers_equal(big, "9" * 4999 + "8")
    assert score_final(f"Final: {big}", big).reward == 1.0
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("junk", ["Final: " + " " * 100_000, "a1" * 50_000, "1," * 50_000,
                                  "final" * 20_000, "\\boxed{" * 10_000, "-" * 100_000])
def test_100kb_of_junk_is_linear(junk):
    start = time.perf_counter()
    extract_final(junk)
    extract_last_number(junk)
    extract_boxed(junk)
    assert time.perf_counter() - start < 1.0  # ~0.1 s here; a quadratic scan would take minutes


@pytest.mark.parametrize("text, expected", [
    ("The answer is 12.", "12"), ("12", "12"), ("eleven", None), ("", None), (None, None),
    ("10-3", "3"), ("x = -4", "-4"), ("1,234,567 and then 3.50", "3.5"), ("H2O", None), ("50%", "50"),
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("3.50", "3.5"), ("3.500", "3.5"), ("007", "7"), ("-0", "0"), ("+3", "3"), ("1,234", "1234"),
    ("$1,234.00", "1234"), ("12.", "12"), ("-.5", "-0.5"), ("1,23", None), ("1,2", None),
    (".", None), ("abc", None), ("1e3", None), ("", None), ("12/5", None), (None, None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_numbers_equal_never_raises_on_garbage():
    assert numbers_equal("3.50", "3.5") and numbers_equal("1,234", "1234") and numbers_equal("-0", "0")
    assert not numbers_equal("abc", "abc")
    assert not numbers_equal(None, "1")
    assert not numbers_equal("1", "1.0001")


def test_gsm8k_truth():
    assert extract_gsm8k_truth("She pays 1000 + 200 = <<1000+200=1200>>1200\n#### 1,200") == "1200"
    assert extract_gsm8k_truth("no marker here") is None


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} no wait \boxed{2}", "2"),
    (r"\fbox{x+1}", "x+1"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{unclosed", None),
    ("no box", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("pred, truth, expected", [
    (r"\frac{1}{2}", "0.5", True),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\dfrac{3}{4}", r"\frac{3}{4}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)", True),
    ("3", "3.0", True),
    ("1,2", "12", False),          # a MATH list, not twelve
    ("x", "y", False),
    (r"\frac{1}{3}", "0.5", False),
    (r"9^{9^{9^{9}}}", "5", False),  # a power tower is refused, not evaluated
    (None, "1", False),
    ("", "", False),
])
def test_math_equal(pred, truth, expected):
    assert math_equal(pred, truth) is expected


def test_math_equal_off_the_main_thread():
    # Ray actors score in worker threads, where math-verify's signal.alarm timeouts would raise.
    results = {}

    def work():
        results["half"] = math_equal(r"\frac{1}{2}", "0.5")
        results["sqrt"] = math_equal(r"2\sqrt{2}", r"\sqrt{8}")
        results["wrong"] = math_equal(r"\frac{1}{3}", "0.5")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert results == {"half": True, "sqrt": True, "wrong": False}


def test_math_equal_sympy_fallback(monkeypatch):
    from raylign.envs import answers

    monkeypatch.setattr(answers, "_math_verify", lambda: None)
    assert math_equal(r"\frac{1}{2}", "0.5")
    assert math_equal(r"2\sqrt{2}", r"\sqrt{8}")
    assert not math_equal(r"\frac{1}{3}", "0.5")
    assert not math_equal("__import__('os')", "1")  # never handed to sympify
    assert math_equal(r"\text{(C)}", r"\text{(C)}")  # string equality last


@pytest.mark.parametrize("completion, lenient, reward, correct, fmt, prediction", [
    ("3 + 4 = 7\nFinal: 7", False, 1.0, True, True, "7"),
    ("Final: 8", False, 0.1, False, True, "8"),
    ("The answer is 7.", False, 0.0, False, False, None),
    ("The answer is 7.", True, 1.0, True, False, "7"),
    ("The answer is 8.", True, 0.0, False, False, "8"),
    ("", True, 0.0, False, False, None),
])
def test_gsm8k_reward(completion, lenient, reward, correct, fmt, prediction):
    score = score_final(completion, "7", lenient=lenient)
    assert (score.reward, score.correct, score.format_ok, score.prediction) == (reward, correct, fmt, prediction)


@pytest.mark.parametrize("completion, lenient, reward, fmt", [
    (r"so \boxed{0.5}", False, 1.0, True),
    (r"\boxed{1/3}", False, 0.1, True),
    ("it is 0.5", False, 0.0, False),
    ("it is 0.5", True, 1.0, False),
    ("it is 7", True, 0.0, False),
])
def test_math_reward(completion, lenient, reward, fmt):
    score = score_boxed(completion, r"\frac{1}{2}", lenient=lenient)
    assert (score.reward, score.format_ok) == (reward, fmt)


@pytest.mark.parametrize("pred, truth", [
    ("10080", r"10,\!080"),        # MATH's negative thin space after the thousands comma
    (r"10,\!080", "10080"),
    ("10080", "10{,}080"),
    ("10080", r"\$10,\!080"),
    ("10080", r"10\,080"), ("10080", r"10\;080"), ("10080", r"10\:080"), ("10080", r"10\ 080"),
    ("10080", "10~080"),
    (r"\$1,\!234.50", "1234.5"),
])
def test_math_equal_ignores_latex_spacing(pred, truth):
    assert math_equal(pred, truth) is True


@pytest.mark.parametrize("pred, truth, expected", [
    ("5!", "120", False),           # factorials are compared as strings, never evaluated (as before)
    ("120", "5!", False),
    ("5!", "5!", True),
    ("n!", "n !", True),
    (r"10,\!081", "10080", False),  # spacing gone, the numbers still have to agree
    (r"1,\!2", "12", False),        # still a MATH list, not twelve
])
def test_math_equal_factorial_unchanged_by_spacing_clean_up(pred, truth, expected):
    assert math_equal(pred, truth) is expected


def test_math_reward_thin_space_answer_is_correct():
    score = score_boxed(r"so the answer is $\boxed{10,\!080}$.", "10080")
    assert (score.reward, score.correct) == (1.0, True)
