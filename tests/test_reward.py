"""Tests for reward.py: one test per rule of ../shared/spec/logic_rl.md §3, plus a property test."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHARED
from reward import Score, parse_solution, score, score_batch, summarize

SOLUTION = "(1) Zoey is a knave\n(2) Oliver is a knight"
RIGHT = "(1) Zoey is a knave\n(2) Oliver is a knight"
WRONG = "(1) Zoey is a knight\n(2) Oliver is a knight"


def turn(answer, think=" reasoning ", between="\n", after=""):
    """An assistant turn as score() expects it: pre-filled <think>, reasoning, then the answer block."""
    return f"<think>{think}</think>{between}<answer> {answer} </answer>{after}"


def load_sample():
    with open(SHARED / "data" / "kk_sample.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- the four totals --------------------------------------------------------------------------------------


def test_correct_answer_scores_3():
    s = score(turn(RIGHT), SOLUTION)
    assert (s.total, s.format, s.answer, s.correct) == (3.0, 1.0, 2.0, True)


def test_wrong_role_scores_minus_half():
    s = score(turn(WRONG), SOLUTION)
    assert (s.total, s.format, s.answer, s.correct) == (-0.5, 1.0, -1.5, False)


def test_person_missing_from_answer_scores_minus_1():
    # two role words, as many as people, but Oliver is never named
    s = score(turn("(1) Zoey is a knave\n(2) The other one is a knight"), SOLUTION)
    assert (s.total, s.format, s.answer) == (-1.0, 1.0, -2.0)


@pytest.mark.parametrize("answer", ["", "   ", "\n\t"])
def test_empty_answer_scores_minus_1(answer):
    s = score("<think> r </think><answer>" + answer + "</answer>", SOLUTION)
    assert (s.total, s.format, s.answer) == (-1.0, 1.0, -2.0)


def test_too_few_role_words_scores_minus_1():
    assert score(turn("Zoey is a knave"), SOLUTION).total == -1.0


def test_too_many_role_words_scores_minus_1():
    assert score(turn(RIGHT + "\n(3) Nobody else is a knave"), SOLUTION).total == -1.0


def test_plural_knights_counts_as_a_role_word():
    # right roles, but "knights" makes three role words for two people
    assert score(turn(RIGHT + ", no other knights"), SOLUTION).total == -1.0
    assert score(turn(RIGHT + ", no others"), SOLUTION).total == 3.0


# ---- format -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["<think>", "</think>", "<answer>", "</answer>"])
def test_missing_tag_scores_minus_3(tag):
    completion = turn(RIGHT).replace(tag, "")
    s = score(completion, SOLUTION)
    assert (s.total, s.format, s.answer, s.correct) == (-3.0, -1.0, -2.0, False)


@pytest.mark.parametrize("tag", ["<think>", "</think>", "<answer>", "</answer>"])
def test_duplicated_tag_scores_minus_3(tag):
    completion = turn(RIGHT).replace(tag, tag + " " + tag)
    assert score(completion, SOLUTION).total == -3.0


@pytest.mark.parametrize(
    "completion",
    [
        f"</think> r <think><answer> {RIGHT} </answer>",  # think tags swapped
        f"<think> r </think></answer> {RIGHT} <answer>",  # answer tags swapped
        f"<answer> {RIGHT} </answer><think> r </think>",  # answer before think
        f"<think> r <answer> {RIGHT} </think></answer>",  # blocks interleaved
    ],
)
def test_tags_out_of_order_score_minus_3(completion):
    assert score(completion, SOLUTION).total == -3.0


@pytest.mark.parametrize("old, new", [("<think>", "<Think>"), ("</answer>", "</ANSWER>")])
def test_tags_are_case_sensitive(old, new):
    assert score(turn(RIGHT).replace(old, new), SOLUTION).total == -3.0


def test_empty_think_passes():
    assert score(turn(RIGHT, think=""), SOLUTION).total == 3.0


def test_text_between_blocks_and_after_answer_passes():
    completion = turn(RIGHT, between="\nSo the answer is:\n", after="\nHope this helps! <|im_end|>")
    assert score(completion, SOLUTION).total == 3.0


def test_assistant_marker_inside_reasoning_does_not_break_the_score():
    think = "Assistant: let me check. User: fine. Assistant: Zoey is a knight? No."
    assert score(turn(RIGHT, think=think), SOLUTION).total == 3.0


# ---- matching names and roles in the answer ------------------------------------------------------------


def test_names_and_roles_match_case_insensitively():
    assert score(turn("ZOEY IS A KNAVE, and oliver Is A Knight."), SOLUTION).total == 3.0


def test_whitespace_between_words_may_span_newlines():
    assert score(turn("Zoey\nis \t a\n  knave; Oliver is\na knight"), SOLUTION).total == 3.0


def test_jackson_does_not_answer_for_jack():
    solution = {"Jack": "knight", "Jackson": "knave"}
    assert score(turn("Jackson is a knave, Jack is a knight"), solution).total == 3.0
    assert score(turn("Jackson is a knave, and the other is a knight"), solution).total == -1.0


def test_isabella_does_not_answer_for_ella():
    # the leading word boundary: "Isabella is a knight" contains "ella is a knight"
    solution = {"Ella": "knight", "Isabella": "knight"}
    assert score(turn("Isabella is a knight, and Ella is a knight"), solution).total == 3.0
    assert score(turn("Isabella is a knight, and the other is a knight"), solution).total == -1.0


def test_role_word_must_end_at_a_word_boundary():
    # "knaveish" holds the substring "knave" (so the count matches) but is not the role word
    assert score(turn("Zoey is a knaveish sort, Oliver is a knight"), SOLUTION).total == -1.0


# ---- solutions -------------------------------------------------------------------------------------------


def test_three_solution_forms_agree_on_the_benchmark_records():
    for record in load_sample():
        from_text = parse_solution(record["solution_text_format"])
        from_bools = parse_solution(dict(zip(record["names"], record["solution"])))
        pairs = zip(record["names"], record["solution"])
        words = {name: "knight" if knight else "knave" for name, knight in pairs}
        from_words = parse_solution(words)
        assert from_text == from_bools == from_words
        assert list(from_text) == record["names"]


def test_benchmark_answers_score_3_and_a_flipped_role_scores_minus_half():
    for record in load_sample():
        answer = record["solution_text_format"]
        first_line, other_lines = answer.split("\n", 1)
        flipped_role = "knave" if first_line.endswith("knight") else "knight"
        flipped = first_line.rsplit(" ", 1)[0] + " " + flipped_role + "\n" + other_lines
        for solution in (answer, dict(zip(record["names"], record["solution"]))):
            assert score(turn(answer), solution).total == 3.0
            assert score(turn(flipped), solution).total == -0.5


@pytest.mark.parametrize(
    "solution, message",
    [
        ("", "empty"),
        ("\n  \n", "empty"),
        ("Zoey is a knight", "not of the form"),
        ("(1) Zoey is a wizard", "role 'wizard'"),
        ("(1) Zoey is a knight.", "role 'knight.'"),
        ("(1) Zoey is a knight\n(3) Oliver is a knave", r"numbered \(3\)"),
        ("(1) Zoey is a knight\n(2) Zoey is a knave", "twice"),
        ("(1) Zoey is a knight\n(2) zoey is a knave", "twice"),
        ({}, "empty"),
        ({"Zoey": "wizard"}, "role 'wizard'"),
        ({"Zoey": "Knight"}, "role 'Knight'"),
        ({"Zoey": 1}, "role 1"),
        ({"": "knight"}, "name ''"),
        ({" Zoey": "knight"}, "name ' Zoey'"),
        ({3: "knight"}, "name 3"),
        ({"Zoey": True, "ZOEY": False}, "twice"),
        ([True, False], "got list"),
        (None, "got NoneType"),
    ],
)
def test_malformed_solution_raises_value_error(solution, message):
    with pytest.raises(ValueError, match=message):
        parse_solution(solution)
    with pytest.raises(ValueError, match=message):
        score(turn(RIGHT), solution)


def test_non_string_completion_raises_value_error():
    with pytest.raises(ValueError, match="completion must be a string"):
        score(None, SOLUTION)


# ---- lenient accuracy (analysis only) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        f"<think> r <answer> {RIGHT} </answer>",  # </think> missing
        f"<think> r </think><answer> draft </answer><answer> {RIGHT} </answer>",  # two answers, last right
        f"<think> r </think><answer> {RIGHT}",  # cut off before </answer>
        f"<think> Zoey is a knave and Oliver is a knight",  # no answer tags at all
    ],
)
def test_right_answer_with_broken_format_is_lenient_correct_only(completion):
    s = score(completion, SOLUTION)
    assert (s.total, s.correct, s.lenient_correct) == (-3.0, False, True)


def test_lenient_reads_the_last_answer_block():
    completion = f"<think> r </think><answer> {RIGHT} </answer><answer> {WRONG} </answer>"
    assert score(completion, SOLUTION).lenient_correct is False


def test_lenient_is_false_for_a_wrong_answer_and_true_for_a_correct_one():
    assert score(turn(WRONG), SOLUTION).lenient_correct is False
    assert score(turn(RIGHT), SOLUTION).lenient_correct is True


# ---- batches ----------------------------------------------------------------------------------------------


def test_score_batch_scores_each_pair():
    scores = score_batch([turn(RIGHT), turn(WRONG)], [SOLUTION, {"Zoey": "knight", "Oliver": "knight"}])
    assert [s.total for s in scores] == [3.0, 3.0]


def test_score_batch_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        score_batch([turn(RIGHT), turn(WRONG)], [SOLUTION])


def test_summarize_hand_made_batch():
    batch = [
        Score(total=3.0, format=1.0, answer=2.0, correct=True, lenient_correct=True),
        Score(total=-0.5, format=1.0, answer=-1.5, correct=False, lenient_correct=False),
        Score(total=-3.0, format=-1.0, answer=-2.0, correct=False, lenient_correct=True),
        Score(total=-1.0, format=1.0, answer=-2.0, correct=False, lenient_correct=False),
    ]
    assert summarize(batch) == pytest.approx(
        {
            "reward": (3.0 - 0.5 - 3.0 - 1.0) / 4,
            "format": (1.0 + 1.0 - 1.0 + 1.0) / 4,
            "answer": (2.0 - 1.5 - 2.0 - 2.0) / 4,
            "accuracy": 1 / 4,
            "format_rate": 3 / 4,
            "lenient_accuracy": 2 / 4,
        }
    )


def test_summarize_rejects_empty_batch():
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


# ---- property: any string gets one of the four totals ----------------------------------------------------

TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<Think>"]
WORDS = ["Zoey", "Oliver", "zoey", "is", "a", "knight", "knave", "knights", "Assistant:", "(1)", "(2)", " ",
         "\n"]
ROLE_WORDS = st.sampled_from(["knight", "knave"])
PLAIN_TEXT = st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=3)), max_size=12).map("".join)
ANY_TEXT = st.lists(st.one_of(st.sampled_from(TAGS + WORDS), st.text(max_size=3)), max_size=20).map("".join)
# right with probability 1/4, wrong 3/4, unparseable when the suffix adds a role word
BOTH_CLAIMS = st.builds(
    lambda zoey, oliver, suffix: f"(1) Zoey is a {zoey}\n(2) Oliver is a {oliver}{suffix}",
    ROLE_WORDS, ROLE_WORDS, st.one_of(st.just(""), PLAIN_TEXT),
)
WELL_FORMED = st.builds(
    lambda think, between, answer, after: f"<think>{think}</think>{between}<answer>{answer}</answer>{after}",
    PLAIN_TEXT, PLAIN_TEXT, st.one_of(BOTH_CLAIMS, PLAIN_TEXT), PLAIN_TEXT,
)


def test_score_never_raises_and_returns_only_the_four_totals():
    seen = set()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(completion=st.one_of(WELL_FORMED, ANY_TEXT, st.text()))
    def check(completion):
        s = score(completion, SOLUTION)
        assert s.total in {3.0, -0.5, -1.0, -3.0}
        assert s.total == s.format + s.answer
        assert s.correct == (s.total == 3.0)
        assert not s.correct or s.lenient_correct
        seen.add(s.total)

    check()
    assert seen == {3.0, -0.5, -1.0, -3.0}  # the strategy reached every branch
