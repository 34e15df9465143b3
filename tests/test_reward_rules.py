"""The two rules of reward.py one at a time: format_score alone (exercise 2) and answer_score alone (exercise 3).

tests/test_reward.py checks score(), which runs both rules; these tests call one rule each, so that a student who
has written one of them sees its tests pass while the other is still missing (exercises/README.md).
"""
import pytest

from reward import answer_score, format_score

ROLES = {"Zoey": "knave", "Oliver": "knight"}
RIGHT = "(1) Zoey is a knave\n(2) Oliver is a knight"
WELL_FORMED = f"<think> reasoning </think>\n<answer> {RIGHT} </answer>"


# ---- exercise 2: the format rule -------------------------------------------------------------------------


@pytest.mark.exercise(2)
@pytest.mark.parametrize("completion", [
    WELL_FORMED,
    "<think></think><answer></answer>",  # empty blocks: nothing but the tags is checked
    "<think> r </think> So the answer is: <answer> x </answer> Hope this helps! <|im_end|>",
])
def test_format_passes_with_each_tag_once_in_order(completion):
    assert format_score(completion) == 1.0


@pytest.mark.exercise(2)
@pytest.mark.parametrize("tag", ["<think>", "</think>", "<answer>", "</answer>"])
def test_format_fails_when_a_tag_is_missing_or_doubled(tag):
    assert format_score(WELL_FORMED.replace(tag, "")) == -1.0
    assert format_score(WELL_FORMED.replace(tag, tag + " " + tag)) == -1.0


@pytest.mark.exercise(2)
@pytest.mark.parametrize("completion", [
    f"</think> r <think><answer> {RIGHT} </answer>",  # think tags swapped
    f"<think> r </think></answer> {RIGHT} <answer>",  # answer tags swapped
    f"<answer> {RIGHT} </answer><think> r </think>",  # answer before think
    f"<think> r <answer> {RIGHT} </think></answer>",  # blocks interleaved
])
def test_format_fails_when_tags_are_out_of_order(completion):
    assert format_score(completion) == -1.0


@pytest.mark.exercise(2)
def test_format_tags_are_literal_and_case_sensitive():
    assert format_score(WELL_FORMED.replace("<think>", "<Think>")) == -1.0
    assert format_score(WELL_FORMED.replace("</answer>", "</ answer>")) == -1.0


# ---- exercise 3: the answer rule -------------------------------------------------------------------------


@pytest.mark.exercise(3)
def test_answer_right_wrong_and_stripped():
    assert answer_score(RIGHT, ROLES) == 2.0
    assert answer_score(f"\n  {RIGHT}  \n", ROLES) == 2.0
    assert answer_score("(1) Zoey is a knight\n(2) Oliver is a knight", ROLES) == -1.5


@pytest.mark.exercise(3)
@pytest.mark.parametrize("answer", ["", "   ", "\n\t"])
def test_answer_empty_is_unparseable(answer):
    assert answer_score(answer, ROLES) == -2.0


@pytest.mark.exercise(3)
def test_answer_role_word_count_must_equal_the_number_of_people():
    assert answer_score("Zoey is a knave", ROLES) == -2.0  # too few
    assert answer_score(RIGHT + "\n(3) Nobody else is a knave", ROLES) == -2.0  # too many
    assert answer_score(RIGHT + ", no other knights", ROLES) == -2.0  # "knights" counts as a role word
    assert answer_score("ZOEY IS A KNAVE, OLIVER IS A KNIGHT", ROLES) == 2.0  # counted in lowercase


@pytest.mark.exercise(3)
def test_answer_every_person_must_be_named():
    assert answer_score("(1) Zoey is a knave\n(2) The other one is a knight", ROLES) == -2.0


@pytest.mark.exercise(3)
def test_answer_matches_case_insensitively_across_whitespace():
    assert answer_score("zoey Is A Knave; OLIVER is a knight", ROLES) == 2.0
    assert answer_score("Zoey\nis \t a\n  knave; Oliver is\na knight", ROLES) == 2.0


@pytest.mark.exercise(3)
def test_answer_names_and_roles_end_at_word_boundaries():
    assert answer_score("Jackson is a knave, Jack is a knight", {"Jack": "knight", "Jackson": "knave"}) == 2.0
    assert answer_score("Jackson is a knave, and the other is a knight", {"Jack": "knight", "Jackson": "knave"}) == -2.0
    assert answer_score("Isabella is a knight, the other is a knight", {"Ella": "knight", "Isabella": "knight"}) == -2.0
    assert answer_score("Zoey is a knaveish sort, Oliver is a knight", ROLES) == -2.0


@pytest.mark.exercise(3)
def test_answer_names_are_regex_escaped():
    # the name "J.R" must match only itself: "JxR is a knight" does not answer for J.R
    roles = {"J.R": "knight", "Oliver": "knight"}
    assert answer_score("JxR is a knight, Oliver is a knight", roles) == -2.0
    assert answer_score("J.R is a knight, Oliver is a knight", roles) == 2.0
