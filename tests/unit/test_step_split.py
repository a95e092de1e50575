"""Reasoning-step boundaries for VinePPO: token end indices, numbers and LaTeX kept whole, merging."""

import pytest

from raylign.algorithms.step_split import STEP_SPLITTERS, split_steps


def steps(pieces, mode="auto", max_steps=99):
    ends = split_steps(pieces, mode, max_steps)
    return ["".join(pieces[a:b]) for a, b in zip([0] + ends[:-1], ends)]


def chars(text):
    return list(text)  # one character per token: boundaries are exactly where the heuristics cut


def test_empty_response_has_no_steps():
    assert split_steps([], "auto", 8) == []


def test_no_boundary_is_one_step():
    assert split_steps(["The", " answer", " is", " 4"], "auto", 8) == [4]


def test_newline_mode_cuts_after_newlines_only():
    text = "First we add. Then\nwe multiply.\n\nDone"
    assert steps(chars(text), "newline") == ["First we add. Then\n", "we multiply.\n\n", "Done"]


def test_sentence_mode_cuts_after_sentence_ends_only():
    text = "We add 2 and 3! Is it 5? Yes it is.\nDone"
    # the newline after a sentence end is whitespace before the next sentence
    assert steps(chars(text), "sentence") == ["We add 2 and 3!", " Is it 5?", " Yes it is.", "\nDone"]


def test_decimals_and_inline_math_stay_whole():
    text = "Pi is 3.14 and $1.5$ is small. Then $x = 2.5$ so x. Next"
    assert steps(chars(text)) == ["Pi is 3.14 and $1.5$ is small.", " Then $x = 2.5$ so x.", " Next"]


def test_latex_is_never_split():
    text = "So \\frac{1}{2}. Then $\\frac{1}{2}. x$ and $$a. b\nc$$ and \\[ y. \\] end. Done"
    assert steps(chars(text)) == ["So \\frac{1}{2}. Then $\\frac{1}{2}. x$ and $$a. b\nc$$ and \\[ y. \\] end.",
                                  " Done"]


def test_a_period_inside_closing_math_ends_the_sentence_after_the_dollar():
    assert steps(chars("So $x = 5.$ Then y")) == ["So $x = 5.$", " Then y"]


def test_dollar_amounts_are_money_not_math():
    # pandoc's rule: "$5. Then he pays $" is not a math span (the closing $ has a space before it)
    assert steps(chars("He pays $5. Then he pays $3 more. Ok")) == ["He pays $5.", " Then he pays $3 more.", " Ok"]


def test_abbreviations_do_not_end_sentences():
    text = "Use a rule, e.g. the sum, i.e. add them. Then stop"
    assert steps(chars(text)) == ["Use a rule, e.g. the sum, i.e. add them.", " Then stop"]


def test_list_items_start_steps_and_keep_their_number():
    text = "Plan:\n1. Add 2 and 3.\n2. Multiply by 4. Done\n- check\n  a) again"
    assert steps(chars(text)) == ["Plan:\n", "1. Add 2 and 3.\n", "2. Multiply by 4.", " Done\n", "- check\n",
                                  "  a) again"]


def test_token_with_newline_in_the_middle_ends_the_step():
    pieces = ["Add", " 2", ".\n\nThe", " sum", " is", " 5", "."]
    assert split_steps(pieces, "newline", 8) == [3, 7]
    assert split_steps(pieces, "auto", 8) == [3, 7]  # the sentence end and the newline fall in one token


def test_sentence_end_cut_goes_before_the_space_token():
    pieces = ["It", " is", " 5", ".", " Then", " 6", "."]
    assert split_steps(pieces, "sentence", 8) == [4, 7]


def test_whitespace_only_steps_join_a_neighbour():
    assert steps(chars("\n\nHi.\n\n  \nBye\n\n")) == ["\n\nHi.\n\n  \n", "Bye\n\n"]
    assert split_steps(["", "Hi", "\n", "", "Yo"], "newline", 8) == [3, 5]  # empty pieces never end a step


def test_max_steps_merges_the_shortest_step_into_its_shorter_neighbour():
    # steps of 3, 1, 2, 4 tokens: the 1-token step joins the 2-token step on its right -> 3, 3, 4
    pieces = ["a", "a", "\n", "b\n", "c", "\n", "d", "d", "d", "d"]
    assert split_steps(pieces, "newline", 99) == [3, 4, 6, 10]
    assert split_steps(pieces, "newline", 3) == [3, 6, 10]
    # then a 3-token tie: the first joins its right neighbour (3 <= 4, no left one) -> 6, 4
    assert split_steps(pieces, "newline", 2) == [6, 10]
    assert split_steps(pieces, "newline", 1) == [10]


def test_max_steps_ties_join_the_left_neighbour():
    pieces = ["x", "x", "\n", "y", "\n", "z", "z", "\n", "w", "w"]  # 3, 2, 3, 2 tokens
    # first shortest is step 1 (2 tokens); neighbours 3 and 3 tie -> joins the left one
    assert split_steps(pieces, "newline", 3) == [5, 8, 10]


def test_registry_and_errors():
    assert set(STEP_SPLITTERS) == {"newline", "sentence", "auto"}
    with pytest.raises(ValueError, match="unknown step split mode"):
        split_steps(["a"], "paragraph", 4)
    with pytest.raises(ValueError, match="max_steps"):
        split_steps(["a"], "auto", 0)
