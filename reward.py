"""The Logic-RL rule reward (arXiv 2502.14768; ../shared/spec/logic_rl.md §3): score one completion.

Format: the assistant turn, *including the `<think>` the prompt pre-fills*, holds each of TAGS exactly once (literal,
case-sensitive), in that order: +1, else -1. Answer, only if the format passed (else -2): the stripped text between the
answer tags scores -2 if empty, if its count of "knight" plus "knave" is not the number of people, or if a person has no
match for `\\b<Name>\\s+is\\s+a\\s+(knight|knave)\\b` (both in any case, first match wins); else +2 all right, -1.5 not.

    total   format  answer   meaning
     3       +1      +2      correct ("accuracy" is the share scoring 3)
    -0.5     +1     -1.5     parsed, some role wrong
    -1       +1     -2       format fine, answer unparseable
    -3       -1     -2       format broken
"""
import re
from dataclasses import dataclass

TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # required once each, in this order
ROLES = ("knight", "knave")

FORMAT_OK = 1.0
FORMAT_BROKEN = -1.0
ANSWER_RIGHT = 2.0
ANSWER_WRONG = -1.5
ANSWER_UNPARSEABLE = -2.0
MAX_TOTAL = FORMAT_OK + ANSWER_RIGHT  # 3.0


@dataclass(frozen=True)
class Score:
    total: float  # format + answer: one of 3, -0.5, -1, -3
    format: float  # +1 or -1
    answer: float  # +2, -1.5 or -2
    correct: bool  # total == 3: the strict training reward's notion of "right"
    lenient_correct: bool  # the last answer block right, whatever the format (lenient_answer_text); analysis only


# ---- The ground truth: {name: "knight" | "knave"} --------------------------------------------------------
SOLUTION_LINE = re.compile(r"\((\d+)\)\s+(.+?)\s+is\s+a\s+(\S+)")  # "(2) Oliver is a knave"; loose role: errors name it


def parse_solution(solution) -> dict[str, str]:
    """{name: "knight" | "knave"}, in the people's order, from a record's `solution_text_format` string or a
    dict {name: "knight" | "knave" | bool (True = knight)}; ValueError for anything else (a caller bug)."""
    if isinstance(solution, str):
        entries = solution_lines(solution)
    elif isinstance(solution, dict):
        entries = [(f"solution entry {name!r}", name, value) for name, value in solution.items()]
    else:
        raise ValueError(f"solution must be a solution_text_format string or a dict of roles, "
                         f"got {type(solution).__name__}")
    roles = {}
    for where, name, role in entries:
        if isinstance(role, bool):  # a dict's True / False
            role = "knight" if role else "knave"
        if not isinstance(name, str) or not re.match(r"\w", name) or name != name.strip():
            raise ValueError(f"{where}: name {name!r} must be a string starting with a letter or digit")
        if role not in ROLES:
            raise ValueError(f"{where}: role {role!r} must be 'knight' or 'knave'")
        if name.lower() in (known.lower() for known in roles):  # answers are matched case-insensitively
            raise ValueError(f"{where}: name {name!r} appears twice")
        roles[name] = role
    if not roles:
        raise ValueError("solution is empty; expected lines like '(1) Zoey is a knight' or a dict of roles")
    return roles


def solution_lines(text: str):
    """(where, name, role) for each line of "(1) Zoey is a knight\\n(2) Oliver is a knave", checking the numbers."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for k, line in enumerate(lines, start=1):
        match = SOLUTION_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"solution line {k} {line!r} is not of the form '({k}) Name is a knight/knave'")
        number, name, role = match.groups()
        if int(number) != k:
            raise ValueError(f"solution line {k} {line!r} is numbered ({number}); expected ({k})")
        yield f"solution line {k} {line!r}", name, role


# ---- The two rules -----------------------------------------------------------------------------------------
# exercise 2: the strict format check
def format_score(completion: str) -> float:
    """+1 if each tag occurs exactly once and they come in the order of TAGS, else -1."""
    if any(completion.count(tag) != 1 for tag in TAGS):
        return FORMAT_BROKEN
    positions = [completion.index(tag) for tag in TAGS]
    in_order = all(a < b for a, b in zip(positions, positions[1:]))
    return FORMAT_OK if in_order else FORMAT_BROKEN


def answer_text(completion: str) -> str:
    """The text between `<answer>` and `</answer>`; only meaningful once format_score passed."""
    return completion.partition("<answer>")[2].partition("</answer>")[0]


def claimed_role(answer: str, name: str) -> str | None:
    """The role ("knight" / "knave") of the answer's first "<Name> is a <role>" for `name`; None if none."""
    match = re.search(rf"\b{re.escape(name)}\s+is\s+a\s+(knight|knave)\b", answer, flags=re.IGNORECASE)
    return match.group(1).lower() if match else None


# exercise 3: the answer parser
def answer_score(answer: str, roles: dict[str, str]) -> float:
    """+2 if every role is right, -1.5 if parsed but some role is wrong, -2 if the answer cannot be parsed."""
    answer = answer.strip()
    if not answer:  # the spec's first rule; the count rule below would also catch it, as there is >= 1 person
        return ANSWER_UNPARSEABLE
    if answer.lower().count("knight") + answer.lower().count("knave") != len(roles):
        return ANSWER_UNPARSEABLE
    claimed = {name: claimed_role(answer, name) for name in roles}
    if None in claimed.values():
        return ANSWER_UNPARSEABLE
    return ANSWER_RIGHT if claimed == roles else ANSWER_WRONG


def lenient_answer_text(completion: str) -> str:
    """After the LAST `<answer>` up to the next `</answer>` (or the end); the whole text if no `<answer>`."""
    _before, tag, after = completion.rpartition("<answer>")
    return after.partition("</answer>")[0] if tag else completion


# ---- Public entry points -----------------------------------------------------------------------------------
def score(completion: str, solution) -> Score:
    """Score one assistant turn. `completion` must include the pre-filled "<think>": "<think>" + generated."""
    roles = parse_solution(solution)
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a string, got {type(completion).__name__}")
    format_ = format_score(completion)
    answer = answer_score(answer_text(completion), roles) if format_ == FORMAT_OK else ANSWER_UNPARSEABLE
    total = format_ + answer
    lenient = answer_score(lenient_answer_text(completion), roles) == ANSWER_RIGHT
    return Score(total=total, format=format_, answer=answer, correct=total == MAX_TOTAL, lenient_correct=lenient)


def score_batch(completions: list[str], solutions: list) -> list[Score]:
    """score() for each (completion, solution) pair; the two lists must have the same length."""
    if len(completions) != len(solutions):
        raise ValueError(f"score_batch got {len(completions)} completions but {len(solutions)} solutions")
    return [score(completion, solution) for completion, solution in zip(completions, solutions)]


def summarize(scores: list[Score]) -> dict[str, float]:
    """Batch statistics for logging: "reward" (mean total), mean "format" and "answer", and three shares."""
    if not scores:
        raise ValueError("summarize needs at least one Score")
    n = len(scores)
    return {"reward": sum(s.total for s in scores) / n, "format": sum(s.format for s in scores) / n,
            "answer": sum(s.answer for s in scores) / n, "accuracy": sum(s.correct for s in scores) / n,
            "format_rate": sum(s.format == FORMAT_OK for s in scores) / n,
            "lenient_accuracy": sum(s.lenient_correct for s in scores) / n}
