"""Knights-and-Knaves puzzles: logic, generator, text, dataset files, prompts and reasoning traces.

../shared/spec/logic_rl.md §1 (the K&K benchmark's puzzles, arXiv 2410.23123) and §2 (the Logic-RL prompts, arXiv
2502.14768). Knights always tell the truth, knaves always lie; each of n people makes one statement. generate()
keeps seeded puzzles with exactly one solution as records in the benchmark's JSONL format; make_prompt() gives the
Logic-RL prompts, ending with a pre-filled "<think>"; local_trace() / sft_completion() what a model writes after it.

Statements are the benchmark's own tuples, person i being 0-based and True meaning "knight":
    ("telling-truth", i)  "i is a knight"        ("lying", i)      "i is a knave"
    ("not", s)            ("and", s1, s2, ...)   ("or", s1, s2, ...)
    ("->", a, b)          ("<=>", a, b)

Command line (writes {out}/train/people{n}_num{train}.jsonl and {out}/test/people{n}_num{test}.jsonl):
    python kk_data.py --people 3-7 --train 900 --test 100 --seed 1234 --out data/kk
"""
import argparse
import ast
import json
import os
import random
import re
import sys
from itertools import product
from pathlib import Path

from tqdm import tqdm

SIZES = range(2, 9)  # the benchmark's puzzle sizes: 2 to 8 people
MAX_DEPTH = 2  # statements are at most one operator deep: an operator over leaves
MAX_FAILED_DRAWS = 20_000  # generate() gives up after this many draws in a row that give no new puzzle

NAMES = ["Emma", "Liam", "Olivia", "Noah", "Ava", "Ethan", "Sophia", "Mason", "Isabella", "William", "Mia", "James",
         "Charlotte", "Benjamin", "Amelia", "Lucas", "Harper", "Henry", "Evelyn", "Alexander", "Abigail", "Michael",
         "Emily", "Daniel", "Elizabeth", "Jacob", "Sofia", "Logan", "Avery", "Jackson", "Ella", "Sebastian", "Scarlett",
         "Jack", "Grace", "Aiden", "Chloe", "Owen", "Victoria", "Samuel", "Riley", "Matthew", "Aria", "Joseph", "Lily",
         "Luke", "Aurora", "David", "Zoey", "Oliver", "Penelope"]

# How a person's statement is reported in the quiz; one frame per person, chosen at random.
FRAMES = ['{name} said that {content}.', '{name} told you that {content}.', '{name} said, "{content}."',
          '{name} stated, "{content}".', 'According to {name}, "{content}".', 'In {name}\'s words: "{content}".',
          '{name} remarked, "{content}".', '"{content}," {name} declared.', '{name} was heard saying, "{content}".',
          '{name} expressed that {content}.', '"{content}" - {name}.', 'As {name} put it, "{content}".',
          '{name} asserted: "{content}".', '"{content}," {name} mentioned.', '{name} commented, "{content}".',
          'In a statement by {name}: "{content}".', '{name} noted, "{content}".', '"{content}," {name} claimed.']

TEMPLATES = ("qwen-instruct", "base", "chat", "tiny")

# Fixed fields of every benchmark record.
KNIGHT_KNAVE = {"knight": "knight", "knave": "knave", "a_knight": "a knight", "a_knave": "a knave",
                "Knight": "Knight", "Knave": "Knave"}
COT_HEAD = ("Let's think step by step, by considering whether each person is lying and if that leads to "
            "contradiction.")
COT_FOOT = "This leads to a feasible solution."

# The fields of a record and their types, in the benchmark's order.
RECORD_FIELDS = {"quiz": str, "names": list, "knight_knave": dict, "solution": list, "solution_text": str,
                 "solution_text_format": str, "cot_head": str, "cot_repeat_steps": list, "cot_foot": str,
                 "statements": str, "index": int}

LEAVES = ("telling-truth", "lying")
OPERATORS = ("not", "and", "or", "->", "<=>")


# ---- 1. Logic: evaluate a statement, brute-force all solutions -------------------------------------------------
def evaluate(statement, assignment):
    """Truth of `statement` when person i is a knight iff assignment[i] (a tuple, list or dict of bools)."""
    op = statement[0]
    if op in LEAVES:
        return assignment[statement[1]] == (op == "telling-truth")
    values = [evaluate(s, assignment) for s in statement[1:]]
    if op == "not":
        return not values[0]
    if op in ("and", "or"):
        return all(values) if op == "and" else any(values)
    if op == "->":
        return not values[0] or values[1]
    if op == "<=>":
        return values[0] == values[1]
    raise ValueError(f"unknown operator {op!r} in statement {statement!r}")


def solve(statements):
    """All assignments (tuples of bools, True = knight, knight-first) in which each role is its claim's truth."""
    return [a for a in product((True, False), repeat=len(statements))
            if all(evaluate(s, a) == a[i] for i, s in enumerate(statements))]


# ---- 2. Sampling (spec section 1, "Sampling"): one statement per person, depth limit 2, width 2 ----------------
def sample_leaf(rng, n_people, speaker):
    """("telling-truth" | "lying", person), both uniform; nobody says "I am a knave" (a paradox): redraw."""
    while True:
        leaf = (rng.choice(LEAVES), rng.randrange(n_people))
        if leaf != ("lying", speaker):
            return leaf


def sample_statement(rng, n_people, speaker, depth=0):
    """d uniform in 0..5: 0 leaf, 1 not, 2 and, 3 or, 4 ->, 5 <=>; below the top level, always a leaf."""
    d = rng.randint(0, 5)
    if depth + 1 >= MAX_DEPTH or d == 0:
        return sample_leaf(rng, n_people, speaker)
    if d == 1:
        return ("not", sample_leaf(rng, n_people, speaker))
    first = second = sample_statement(rng, n_people, speaker, depth + 1)
    while second == first:  # the two sub-statements must differ
        second = sample_statement(rng, n_people, speaker, depth + 1)
    return (OPERATORS[d - 1], first, second)  # d = 2..5: "and", "or", "->", "<=>"


def sample_puzzle(rng, n_people):
    """One statement per person: a tuple of n statement trees."""
    return tuple(sample_statement(rng, n_people, speaker) for speaker in range(n_people))


# ---- 3. Text: how the benchmark phrases statements, quizzes and solutions --------------------------------------
def role_word(is_knight):
    return "knight" if is_knight else "knave"


def join_names(names):
    """"A, B, and C"; with two names "A, and B" (the benchmark always writes the comma)."""
    return ", ".join(names[:-1]) + ", and " + names[-1]


def phrase(statement, names):
    """Statement as quiz text: "X is a knight", "X is not a knave", "If A then B", "A if and only if B"."""
    op = statement[0]
    if op in LEAVES:
        return f"{names[statement[1]]} is a {role_word(op == 'telling-truth')}"
    if op == "not":
        leaf = statement[1]
        if leaf[0] not in LEAVES:
            raise ValueError(f"only a leaf can be negated in text, got {statement!r}")
        return f"{names[leaf[1]]} is not a {role_word(leaf[0] == 'telling-truth')}"
    if op in ("and", "or"):
        return f" {op} ".join(phrase(s, names) for s in statement[1:])
    if op == "->":
        return f"If {phrase(statement[1], names)} then {phrase(statement[2], names)}"
    if op == "<=>":
        return f"{phrase(statement[1], names)} if and only if {phrase(statement[2], names)}"
    raise ValueError(f"unknown operator {op!r} in statement {statement!r}")


def quiz_text(statements, names, frames):
    """The puzzle as the benchmark writes it; frames[i] reports person i's statement."""
    said = " ".join(frame.format(name=names[i], content=phrase(statements[i], names))
                    for i, frame in enumerate(frames))
    return ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
            f"and knaves always lie. You meet {len(names)} inhabitants: {join_names(names)}. {said} "
            "So who is a knight and who is a knave?")


def solution_text(names, solution):
    """"Zoey is a knave, and Oliver is a knight." """
    return join_names([f"{name} is a {role_word(k)}" for name, k in zip(names, solution)]) + "."


def solution_text_format(names, solution):
    """"(1) Zoey is a knave\\n(2) Oliver is a knight" """
    return "\n".join(f"({i + 1}) {name} is a {role_word(k)}" for i, (name, k) in enumerate(zip(names, solution)))


# ---- 4. The benchmark's chain of thought (cot_repeat_steps), reconstructed from its data: a depth-first search ----
# People are visited in depth-first order of who mentions whom (person 0 first, then the people their
# statement names, left to right, ...). Each visited person is assumed a knight, then a knave; an assumption
# fails when some assigned speaker's statement (checked in person order) is already false for a knight, or
# already true for a knave, whatever the people not yet assigned turn out to be.
def mentioned_people(statement):
    """People named in a statement, left to right (repeats kept)."""
    if statement[0] in LEAVES:
        return [statement[1]]
    return [person for s in statement[1:] for person in mentioned_people(s)]


def visiting_order(statements):
    """Depth-first order over the "mentions" graph, starting from person 0, then any not yet reached."""
    order = []

    def visit(person):
        if person not in order:
            order.append(person)
            for other in mentioned_people(statements[person]):
                visit(other)

    for person in range(len(statements)):
        visit(person)
    return order


def contradicts(statement, speaker, partial):
    """True when no completion of the unassigned people mentioned makes `speaker`'s statement fit their role."""
    unknown = sorted(set(mentioned_people(statement)) - set(partial))
    return not any(evaluate(statement, {**partial, **dict(zip(unknown, values))}) == partial[speaker]
                   for values in product((True, False), repeat=len(unknown)))


def assume_sentence(names, statements, person, is_knight):
    """ "Assume Zoey is a knight. No contradiction is found in their claim that Oliver is not a knight." """
    return (f"Assume {names[person]} is a {role_word(is_knight)}. No contradiction is found in their "
            f"{'claim' if is_knight else 'false claim'} that {phrase(statements[person], names)}.")


def cannot_sentence(names, statements, person, is_knight, speaker, speaker_is_knight):
    """ "Oliver cannot be a knave, because this would contradict the false claim of their own that ..." """
    whose = "their own" if speaker == person else names[speaker]
    return (f"{names[person]} cannot be a {role_word(is_knight)}, because this would contradict the "
            f"{'claim' if speaker_is_knight else 'false claim'} of {whose} that {phrase(statements[speaker], names)}.")


def backtrack_sentence(names, exhausted, person):
    """Lists the people whose options ran out ("A", "A and B", "A, B, and C"), deepest first."""
    listed = [names[p] for p in exhausted]
    who = join_names(listed) if len(listed) > 2 else " and ".join(listed)
    return f"We have exhausted all possibilities for {who}, so let us go back and reconsider {names[person]}."


def cot_steps(statements, names):
    """The benchmark's cot_repeat_steps: the sentences of a depth-first search, knight tried before knave."""
    order, partial, steps, exhausted = visiting_order(statements), {}, [], []

    def search(k):
        if k == len(order):
            return True
        person = order[k]
        for is_knight in (True, False):
            partial[person] = is_knight
            blamed = [s for s in sorted(partial) if contradicts(statements[s], s, partial)]
            if blamed:
                steps.append(cannot_sentence(names, statements, person, is_knight, blamed[0], partial[blamed[0]]))
                continue
            steps.append(assume_sentence(names, statements, person, is_knight))
            if search(k + 1):
                return True
            if is_knight:  # the knight branch failed further down: say so, then try knave
                steps.append(backtrack_sentence(names, exhausted, person))
                exhausted.clear()
        del partial[person]
        exhausted.append(person)
        return False

    if not search(0):
        raise ValueError(f"puzzle {statements!r} has no solution")
    return steps


# ---- 5. Records and the generator ------------------------------------------------------------------------------
def make_record(statements, names, frames, index):
    """A record in the benchmark's JSONL format (same fields, same order). The puzzle must have one solution."""
    solutions = solve(statements)
    if len(solutions) != 1:
        raise ValueError(f"puzzle {statements!r} has {len(solutions)} solutions, not exactly one")
    solution = list(solutions[0])
    return {
        "quiz": quiz_text(statements, names, frames),
        "names": list(names),
        "knight_knave": dict(KNIGHT_KNAVE),
        "solution": solution,
        "solution_text": solution_text(names, solution),
        "solution_text_format": solution_text_format(names, solution),
        "cot_head": COT_HEAD,
        "cot_repeat_steps": cot_steps(statements, names),
        "cot_foot": COT_FOOT,
        "statements": str(statements),
        "index": index,
    }


def generate(n_people, count, seed, strict=True, progress=False, max_failed_draws=MAX_FAILED_DRAWS):
    """`count` distinct puzzles with exactly one solution, as records, drawn with random.Random(seed); after
    `max_failed_draws` draws in a row without a new one (2 people has 399), ValueError (strict) or those found."""
    if n_people not in SIZES:
        raise ValueError(f"n_people={n_people}: the benchmark's sizes are {SIZES.start}..{SIZES.stop - 1}")
    rng = random.Random(seed)
    records, seen, failed = [], set(), 0
    with tqdm(total=count, desc=f"{n_people} people", disable=not progress) as bar:
        while len(records) < count and failed < max_failed_draws:
            statements = sample_puzzle(rng, n_people)
            if statements in seen or len(solve(statements)) != 1:
                failed += 1
                continue
            failed = 0
            seen.add(statements)
            names = rng.sample(NAMES, n_people)
            frames = [rng.choice(FRAMES) for _ in range(n_people)]
            records.append(make_record(statements, names, frames, index=len(records)))
            bar.update(1)
    if len(records) < count and strict:
        raise ValueError(f"only {len(records)} distinct {n_people}-people puzzles found (asked for {count}): "
                         f"{failed} draws in a row gave no new puzzle")
    return records


def make_splits(sizes, n_train, n_test, seed, progress=False):
    """Disjoint ({size: train records}, {size: test records}), one generate() call per size: the first n_test
    are the test set (so it does not change with n_train); a size with too few puzzles (2) trains on the rest."""
    train, test = {}, {}
    for n in sizes:
        records = generate(n, n_train + n_test, seed, strict=False, progress=progress)
        if len(records) <= n_test:
            raise ValueError(f"{n} people: only {len(records)} distinct puzzles exist, not enough for "
                             f"{n_test} test puzzles and some training ones")
        test[n] = [{**r, "index": i} for i, r in enumerate(records[:n_test])]
        train[n] = [{**r, "index": i} for i, r in enumerate(records[n_test:])]
    return train, test


# ---- 6. Files: parse and validate the benchmark's JSONL (official files and ours alike) ------------------------
def check_statement(statement, n_people=None):
    """Raise ValueError unless `statement` is a well-formed tree (about people 0..n_people-1 when given)."""
    if not isinstance(statement, tuple) or not statement or not isinstance(statement[0], str):
        raise ValueError(f"a statement must be a tuple starting with its operator, got {statement!r}")
    op, args = statement[0], statement[1:]
    if op in LEAVES:
        if len(args) != 1 or type(args[0]) is not int or args[0] < 0:
            raise ValueError(f"{op!r} takes one person index, got {statement!r}")
        if n_people is not None and args[0] >= n_people:
            raise ValueError(f"person {args[0]} out of range for {n_people} people in {statement!r}")
        return
    expected = {"not": len(args) == 1, "and": len(args) >= 2, "or": len(args) >= 2, "->": len(args) == 2,
                "<=>": len(args) == 2}
    if op not in expected:
        raise ValueError(f"unknown operator {op!r} in {statement!r}; known: {LEAVES + OPERATORS}")
    if not expected[op]:
        raise ValueError(f"wrong number of operands for {op!r} in {statement!r}")
    for sub in args:
        check_statement(sub, n_people)


def parse_statements(text, n_people=None):
    """The `statements` field (Python str() of a tuple of trees) back into the tuple, validated."""
    try:
        statements = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"statements are not a Python literal: {text!r} ({error})") from None
    if not isinstance(statements, tuple) or not statements:
        raise ValueError(f"statements must be a non-empty tuple of statement trees, got {text!r}")
    if n_people is not None and len(statements) != n_people:
        raise ValueError(f"{len(statements)} statements for {n_people} people")
    for statement in statements:
        check_statement(statement, len(statements))
    return statements


def check_fields(row, fields):
    """ValueError (without location) unless `row` is a JSON object with every field of `fields` ({name: type, or a
    tuple of number types}) holding a value of that type; a bool is none of them. Also checks OREO's rows."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for field, kind in fields.items():
        if field not in row:
            raise ValueError(f"missing field {field!r}")
        if not isinstance(row[field], kind) or isinstance(row[field], bool):
            raise ValueError(f"field {field!r} has type {type(row[field]).__name__}, expected "
                             f"{kind.__name__ if isinstance(kind, type) else 'a number'}")


def check_record(record):
    """Raise ValueError (without location) unless `record` is a complete, self-consistent benchmark record."""
    check_fields(record, RECORD_FIELDS)
    for field, kind in (("names", str), ("solution", bool), ("cot_repeat_steps", str)):
        if not all(isinstance(x, kind) for x in record[field]):
            raise ValueError(f"field {field!r} should hold only {kind.__name__} values")
    names, solution = record["names"], record["solution"]
    if len(names) != len(solution):
        raise ValueError(f"{len(names)} names but {len(solution)} roles in solution")
    if len(set(names)) != len(names) or not all(re.search(rf"\b{re.escape(n)}\b", record["quiz"]) for n in names):
        raise ValueError(f"names {names} must be distinct and each must occur in the quiz")
    statements = parse_statements(record["statements"], len(names))
    for i, statement in enumerate(statements):
        if evaluate(statement, solution) != solution[i]:
            raise ValueError(f"solution {solution} does not satisfy the statement of person {i} ({names[i]}): "
                             f"{statement!r}")
    for field, render in (("solution_text", solution_text), ("solution_text_format", solution_text_format)):
        if record[field] != render(names, solution):  # the reward grades against solution_text_format
            raise ValueError(f"field {field!r} is {record[field]!r}, but names and solution say "
                             f"{render(names, solution)!r}")


def read_jsonl(path, check_row, key=None, truncated_tail_ok=False):
    """Rows of a JSONL file (blank lines skipped); ValueError naming path:line for bad UTF-8 or JSON, a row check_row
    refuses or a repeated key(row). truncated_tail_ok: an unparsable newline-less last line is dropped (warned)."""
    rows, first_line = [], {}  # key -> the line it was first seen on
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                if truncated_tail_ok and not raw.endswith(b"\n"):
                    print(f"warning: {path}:{line_number}: dropped a truncated last line", file=sys.stderr)
                    break
                what = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else "invalid JSON"
                raise ValueError(f"{path}:{line_number}: {what} ({error})") from None
            try:
                check_row(row)
                if key is not None and first_line.setdefault(key(row), line_number) != line_number:
                    raise ValueError(f"a duplicate of line {first_line[key(row)]}")
            except ValueError as error:
                raise ValueError(f"{path}:{line_number}: {error}") from None
            rows.append(row)
    return rows


def load_jsonl(path, n_people=None):
    """Records of a benchmark-format JSONL file (of n_people people each, when given, as a test file's name
    promises); a bad row or a repeated quiz raises ValueError naming path:line."""
    def check(record):
        check_record(record)
        if n_people is not None and len(record["names"]) != n_people:
            raise ValueError(f"a puzzle with {len(record['names'])} people in a file named for {n_people}")

    return read_jsonl(path, check, key=lambda record: record["quiz"])


def write_atomically(path, text):
    """Write `text` to `path` via a temporary file and a rename (parents created): a kill leaves no truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def save_jsonl(records, path):
    """One JSON object per line, the benchmark's layout; written atomically, parent folders created."""
    write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))


def check_writable(path, folder=False):
    """ValueError unless `path` can be written, as a file (or with folder=True a folder), checked before any
    work and creating nothing: it is not the other kind, and its nearest existing folder is writable."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{path} is {'a file, not a folder' if folder else 'a folder, not a file'}")
    existing = next(p for p in ([path] if folder else []) + list(path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{path} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path} cannot be written: the folder {existing} is not writable")


# ---- 7. Prompts (spec section 2), byte for byte; every template ends with the pre-filled "<think>" -------------
# The original system prompt (missing space in "and<answer>", two spaces before "Now" are in the original).
SYSTEM_PROMPT = ("You are a helpful assistant. The assistant first thinks about the reasoning process in the mind and "
                 "then provides the user with the answer. The reasoning process and answer are enclosed within <think> "
                 "</think> and<answer> </answer> tags, respectively, i.e., <think> reasoning process here "
                 "</think><answer> answer here </answer>.  Now the user asks you to solve a logical reasoning problem. "
                 "After thinking, when you finally reach a conclusion, clearly state the identity of each character "
                 "within <answer> </answer> tags. i.e., <answer> (1) Zoey is a knight\n(2) ... </answer>.")
BASE_PROMPT = ("The user asks a question, and the Assistant solves it.The assistant first thinks about the reasoning "
               "process in the mind and then provides the user with the final answer. The reasoning process and answer "
               "are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> "
               "reasoning process here </think><answer> answer here </answer>. Now the user asks you to solve a "
               "logical reasoning problem. After thinking, when you finally reach a conclusion, clearly state the "
               "identity of each character within <answer> </answer> tags. List the identity of each person one by "
               "one, for example, <answer> (1) Zoey is a knight\n(2) Oliver is a knight\n(3)... </answer>.")


def make_prompt(record, template, tokenizer=None):
    """The prompt for one record: "qwen-instruct", "base", "chat" (needs a tokenizer) or "tiny"."""
    quiz = record["quiz"]
    if template == "qwen-instruct":
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}\n<|im_end|>\n<|im_start|>user\n{quiz}\n<|im_end|>\n"
                "<|im_start|>assistant\n<think>")
    if template == "base":
        return f"{BASE_PROMPT}\n\nUser:{quiz}\nAssistant: <think>"
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template 'chat' needs a tokenizer (it uses tokenizer.apply_chat_template)")
        # The original turns end with a newline; kept, so that Qwen's chat template gives "qwen-instruct".
        messages = [{"role": "system", "content": SYSTEM_PROMPT + "\n"}, {"role": "user", "content": quiz + "\n"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "<think>"
    if template == "tiny":
        return quiz + "\n<think>"
    raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")


# ---- 8. Training targets: what follows "<think>" (see ../shared/research/cpu_learnability.md) ------------------
def truth_letter(value):
    return "T" if value else "F"


def trace_expression(statement, names, assignment):
    """A statement with every looked-up value written out: "if Zoey knight T then Oliver knave F"."""
    op = statement[0]
    if op in LEAVES:
        claim = f"{names[statement[1]]} {role_word(op == 'telling-truth')}"
        return f"{claim} {truth_letter(evaluate(statement, assignment))}"
    parts = [trace_expression(s, names, assignment) for s in statement[1:]]
    if op == "not":
        return f"not {parts[0]}"
    if op in ("and", "or"):
        return f" {op} ".join(parts)
    if op == "->":
        return f"if {parts[0]} then {parts[1]}"
    if op == "<=>":
        return f"{parts[0]} iff {parts[1]}"
    raise ValueError(f"unknown operator {op!r} in statement {statement!r}")


# exercise 1: the local trace, a reasoning target a tiny model can learn
def local_trace(record):
    """Try assignments knight-first (first person most significant); check people in order, stop at the
    first failed check; stop after the first assignment whose checks all pass (the unique solution)."""
    names = record["names"]
    statements = parse_statements(record["statements"], len(names))
    steps = []
    for assignment in product((True, False), repeat=len(names)):
        steps.append("try " + " ".join(f"{name} {role_word(k)}" for name, k in zip(names, assignment)) + " :")
        for i, statement in enumerate(statements):
            value = evaluate(statement, assignment)
            verdict = "ok" if value == assignment[i] else "bad"
            steps.append(f"{names[i]} {role_word(assignment[i])} says "
                         f"{trace_expression(statement, names, assignment)} = {truth_letter(value)} {verdict} ;")
            if verdict == "bad":
                break
        else:  # every check passed: the unique solution
            return " ".join(steps)
    raise ValueError(f"puzzle {record['statements']} has no solution")


SFT_STYLES = ("trace", "cot", "answer")


def sft_completion(record, style="trace"):
    """Reasoning, then the answer: " {reasoning} </think>\\n<answer> {solution_text_format} </answer>"; the reasoning
    is local_trace ("trace"), the benchmark's depth-first explanation ("cot") or nothing ("answer"; NOTES.md)."""
    reasoning = ""  # style "answer"
    if style == "trace":
        reasoning = " " + local_trace(record)
    elif style == "cot":
        reasoning = " " + " ".join([record["cot_head"], *record["cot_repeat_steps"], record["cot_foot"]])
    elif style != "answer":
        raise ValueError(f"unknown completion style {style!r}; choose one of {SFT_STYLES}")
    return f"{reasoning} </think>\n<answer> {record['solution_text_format']} </answer>"


# ---- 9. Vocabulary: texts holding every word the generator, the templates and the targets can write ------------
def corpus_text():
    """Texts for building the tiny model's word-level tokenizer (words split by the regex \\w+|[^\\w\\s]+)."""
    names = NAMES[:8]
    leaf, other = ("telling-truth", 0), ("lying", 1)
    every_kind = [leaf, other, ("not", leaf), ("not", other), ("and", leaf, other), ("or", leaf, other),
                  ("->", leaf, other), ("<=>", leaf, other)]
    # A worked 2-person example: its trace has "try", "says", both letters T/F and both verdicts ok/bad.
    example_statements = (("->", ("telling-truth", 0), ("lying", 1)), ("<=>", ("telling-truth", 0), ("lying", 0)))
    example = make_record(example_statements, names[:2], FRAMES[:2], index=0)
    texts = [" ".join(NAMES)]
    texts += [frame.format(name=names[0], content=phrase(s, names)) for frame in FRAMES for s in every_kind]
    texts += [quiz_text(every_kind[:n], names[:n], FRAMES[:n]) for n in SIZES]
    texts += [solution_text(names, [True, False] * 4), solution_text_format(names, [True, False] * 4)]
    texts += [COT_HEAD, COT_FOOT, backtrack_sentence(names, [0, 1, 2], 3), backtrack_sentence(names, [0, 1], 2)]
    texts += [assume_sentence(names, every_kind, 0, k) for k in (True, False)]
    texts += [cannot_sentence(names, every_kind, 0, k, speaker, sk)
              for k in (True, False) for speaker in (0, 1) for sk in (True, False)]
    texts += [trace_expression(s, names, (k, not k)) for s in every_kind for k in (True, False)]
    texts += [make_prompt(example, t) for t in TEMPLATES if t != "chat"]
    texts += [sft_completion(example, style) for style in ("trace", "cot")]
    return texts


# ---- 10. Command line ------------------------------------------------------------------------------------------
def parse_sizes(text):
    """ "3-7" -> [3, 4, 5, 6, 7];  "2,4" -> [2, 4];  "5" -> [5]; anything else ("7-3", "x") raises ValueError."""
    span = re.fullmatch(r"(\d+)-(\d+)", text)
    if span and int(span[1]) <= int(span[2]):
        return list(range(int(span[1]), int(span[2]) + 1))
    if re.fullmatch(r"\d+(,\d+)*", text):
        return [int(part) for part in text.split(",")]
    raise ValueError(f'sizes are written "a-b" (a <= b), "a,b,c" or "a", got {text!r}')


def main():
    parser = argparse.ArgumentParser(description="Write Knights-and-Knaves train/test JSONL files per size.")
    parser.add_argument("--people", default="3-7", help='sizes, "a-b" or "a,b,c" (2..8)')
    parser.add_argument("--train", type=int, default=900, help="training puzzles per size")
    parser.add_argument("--test", type=int, default=100, help="test puzzles per size")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="data/kk")
    args = parser.parse_args()
    train, test = make_splits(parse_sizes(args.people), args.train, args.test, args.seed, progress=True)
    for n in train:  # file names give the real count: 2 people may have fewer training puzzles than asked
        save_jsonl(train[n], Path(args.out) / "train" / f"people{n}_num{len(train[n])}.jsonl")
        save_jsonl(test[n], Path(args.out) / "test" / f"people{n}_num{len(test[n])}.jsonl")
    print(f"wrote {args.out}/train and {args.out}/test for sizes {sorted(train)}")


if __name__ == "__main__":
    main()
