"""Tests for kk_data.py: logic, sampler, text, files, prompts, traces (../shared/spec/logic_rl.md §1-2)."""
import json
import random
import re
import subprocess
import sys
import time
from itertools import product

import pytest

import kk_data
from conftest import ROOT, SHARED

SAMPLE = SHARED / "data" / "kk_sample.jsonl"
T, F = True, False
WORDS = re.compile(r"\w+|[^\w\s]+")


def independent_solutions(statements):
    """A second solver, not sharing code with kk_data: truth of each statement as a bitmask over all worlds.

    World w (0 <= w < 2^n) makes person i a knight iff bit (n-1-i) of w is 0, i.e. knight-first order."""
    n = len(statements)
    everything = (1 << (1 << n)) - 1
    knight = [sum(1 << w for w in range(1 << n) if not (w >> (n - 1 - i)) & 1) for i in range(n)]

    def mask(s):
        if s[0] == "telling-truth":
            return knight[s[1]]
        if s[0] == "lying":
            return everything & ~knight[s[1]]
        parts = [mask(x) for x in s[1:]]
        if s[0] == "not":
            return everything & ~parts[0]
        if s[0] == "and":
            return parts[0] & parts[1]
        if s[0] == "or":
            return parts[0] | parts[1]
        if s[0] == "->":
            return (everything & ~parts[0]) | parts[1]
        return everything & ~(parts[0] ^ parts[1])  # "<=>"

    fits = everything
    for i, s in enumerate(statements):
        fits &= everything & ~(knight[i] ^ mask(s))  # knight iff statement true
    return [tuple(not (w >> (n - 1 - i)) & 1 for i in range(n)) for w in range(1 << n) if (fits >> w) & 1]


def all_two_person_puzzles():
    """Every pair of statements the spec's sampler can draw for 2 people (enumerated, not sampled)."""
    def statements_of(speaker):
        leaves = [(kind, p) for kind in ("telling-truth", "lying") for p in (0, 1) if (kind, p) != ("lying", speaker)]
        pairs = [(op, a, b) for op in ("and", "or", "->", "<=>") for a in leaves for b in leaves if a != b]
        return leaves + [("not", leaf) for leaf in leaves] + pairs
    return list(product(statements_of(0), statements_of(1)))


def sample_records():
    with open(SAMPLE) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(tmp_path, lines):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---- logic ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("statement, assignment, expected", [
    (("telling-truth", 1), (F, T), T),
    (("lying", 1), (F, T), F),
    (("not", ("lying", 0)), (F, T), F),
    (("and", ("telling-truth", 0), ("telling-truth", 1)), (T, F), F),
    (("or", ("telling-truth", 0), ("telling-truth", 1)), (T, F), T),
    (("->", ("telling-truth", 1), ("lying", 0)), (T, F), T),   # false premise
    (("->", ("telling-truth", 0), ("lying", 0)), (T, F), F),   # true premise, false conclusion
    (("<=>", ("lying", 0), ("lying", 1)), (F, F), T),
    (("<=>", ("lying", 0), ("lying", 1)), (T, F), F),
])
def test_evaluate_follows_truth_tables(statement, assignment, expected):
    assert kk_data.evaluate(statement, assignment) is expected


def test_solve_returns_every_solution_and_none_for_a_paradox():
    both_claim_knight = (("telling-truth", 0), ("telling-truth", 1))  # anything goes
    assert kk_data.solve(both_claim_knight) == [(T, T), (T, F), (F, T), (F, F)]
    paradox = (("not", ("telling-truth", 0)), ("telling-truth", 1))  # "I am not a knight"
    assert kk_data.solve(paradox) == []


def test_solve_agrees_with_an_independent_solver_on_every_two_person_puzzle():
    for statements in all_two_person_puzzles():
        assert kk_data.solve(statements) == independent_solutions(statements)


# ---- sampler ----------------------------------------------------------------------------------------------


def test_sample_statement_has_the_spec_shapes():
    rng = random.Random(0)
    ops = set()
    for _ in range(3000):
        speaker = rng.randrange(4)
        s = kk_data.sample_statement(rng, 4, speaker)
        ops.add(s[0])
        leaves = [s] if s[0] in ("telling-truth", "lying") else list(s[1:])
        assert all(leaf[0] in ("telling-truth", "lying") and 0 <= leaf[1] < 4 for leaf in leaves)  # depth <= 2
        assert ("lying", speaker) not in leaves  # nobody says "I am a knave"
        if s[0] == "not":
            assert len(s) == 2
        elif s[0] in ("and", "or", "->", "<=>"):
            assert len(s) == 3 and s[1] != s[2]  # two distinct sub-statements
    assert ops == {"telling-truth", "lying", "not", "and", "or", "->", "<=>"}


@pytest.mark.parametrize("n", range(2, 9))
def test_generated_puzzles_have_exactly_the_recorded_solution(n):
    records = kk_data.generate(n, 25, seed=n)
    for r in records:
        statements = kk_data.parse_statements(r["statements"])
        assert len(statements) == n
        assert independent_solutions(statements) == [tuple(r["solution"])]


def test_generated_puzzles_are_distinct_and_indexed():
    records = kk_data.generate(3, 300, seed=7)
    assert len({r["statements"] for r in records}) == 300
    assert [r["index"] for r in records] == list(range(300))


def test_generate_is_deterministic_in_its_seed():
    assert kk_data.generate(4, 20, seed=11) == kk_data.generate(4, 20, seed=11)
    assert kk_data.generate(4, 20, seed=11) != kk_data.generate(4, 20, seed=12)


def test_two_people_run_out_with_a_clear_error_instead_of_hanging():
    distinct = sum(len(independent_solutions(s)) == 1 for s in all_two_person_puzzles())
    start = time.time()
    with pytest.raises(ValueError, match=rf"only {distinct} distinct 2-people puzzles"):
        kk_data.generate(2, 1000, seed=0)
    assert time.time() - start < 10


def test_generate_rejects_sizes_outside_the_benchmark():
    with pytest.raises(ValueError, match="n_people=9"):
        kk_data.generate(9, 1, seed=0)


def test_make_splits_are_disjoint_and_cap_two_people():
    train, test = kk_data.make_splits([2, 3], n_train=500, n_test=50, seed=3)
    assert len(train[3]) == 500 and len(test[3]) == 50 and len(test[2]) == 50
    assert 0 < len(train[2]) < 500  # 2 people has fewer than 550 distinct puzzles: the rest go to training
    for n in (2, 3):
        assert not {r["statements"] for r in train[n]} & {r["statements"] for r in test[n]}
        assert [r["index"] for r in train[n]] == list(range(len(train[n])))
    # The test split does not depend on how much training data is asked for.
    assert kk_data.make_splits([3], n_train=10, n_test=50, seed=3)[1][3] == test[3]


# ---- text -------------------------------------------------------------------------------------------------


def test_rendering_names_everyone_and_states_the_solution():
    for r in kk_data.generate(5, 30, seed=2):
        assert len(set(r["names"])) == 5 and set(r["names"]) <= set(kk_data.NAMES)
        for name in r["names"]:
            assert re.search(rf"\b{name}\b", r["quiz"])
        assert r["quiz"].startswith("A very special island") and r["quiz"].endswith("who is a knave?")
        roles = ["knight" if k else "knave" for k in r["solution"]]
        lines = r["solution_text_format"].split("\n")
        assert lines == [f"({i + 1}) {name} is a {role}" for i, (name, role) in enumerate(zip(r["names"], roles))]
        assert re.findall(r"(\w+) is a (knight|knave)", r["solution_text"]) == list(zip(r["names"], roles))


def test_phrasing_rules():
    names = ["Zoey", "Oliver"]
    assert kk_data.phrase(("not", ("telling-truth", 1)), names) == "Oliver is not a knight"
    assert kk_data.phrase(("->", ("lying", 0), ("telling-truth", 1)), names) == \
        "If Zoey is a knave then Oliver is a knight"
    assert kk_data.phrase(("<=>", ("lying", 0), ("lying", 1)), names) == \
        "Zoey is a knave if and only if Oliver is a knave"
    assert kk_data.phrase(("or", ("lying", 0), ("telling-truth", 0)), names) == \
        "Zoey is a knave or Zoey is a knight"
    assert kk_data.join_names(names) == "Zoey, and Oliver"
    assert kk_data.solution_text(names, [T, F]) == "Zoey is a knight, and Oliver is a knave."


def test_sample_records_are_rebuilt_byte_for_byte():
    """Quiz, texts and the depth-first chain of thought of all 21 benchmark records, from their statements."""
    for r in sample_records():
        statements = kk_data.parse_statements(r["statements"])
        frames = []
        for i, statement in enumerate(statements):  # which frame reported each person's statement
            content = kk_data.phrase(statement, r["names"])
            frames.append(next(f for f in kk_data.FRAMES if f.format(name=r["names"][i], content=content) in r["quiz"]))
        assert kk_data.make_record(statements, r["names"], frames, r["index"]) == r


# ---- files ------------------------------------------------------------------------------------------------


def test_sample_file_loads_solves_and_round_trips(tmp_path):
    records = kk_data.load_jsonl(SAMPLE)
    assert len(records) == 21
    for r in records:
        assert kk_data.solve(kk_data.parse_statements(r["statements"])) == [tuple(r["solution"])]
    kk_data.save_jsonl(records, tmp_path / "deep" / "folder" / "copy.jsonl")
    assert (tmp_path / "deep" / "folder" / "copy.jsonl").read_bytes() == SAMPLE.read_bytes()


def test_load_jsonl_reads_back_generated_records(tmp_path):
    records = kk_data.generate(6, 10, seed=4)
    kk_data.save_jsonl(records, tmp_path / "six.jsonl")
    assert kk_data.load_jsonl(tmp_path / "six.jsonl") == records


def test_load_jsonl_checks_the_size_a_test_file_name_promises(tmp_path):
    path = tmp_path / "people2_num2.jsonl"
    kk_data.save_jsonl(kk_data.generate(2, 1, seed=0) + kk_data.generate(3, 1, seed=0), path)
    assert len(kk_data.load_jsonl(path)) == 2  # any size without n_people
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: a puzzle with 3 people in a file named for 2")):
        kk_data.load_jsonl(path, 2)


def good_row(**changes):
    row = sample_records()[0]
    row.update(changes)
    return row


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "invalid JSON"),
    (json.dumps({k: v for k, v in good_row().items() if k != "cot_foot"}), "missing field 'cot_foot'"),
    (json.dumps(good_row(solution="knight")), "field 'solution' has type str, expected list"),
    (json.dumps(good_row(solution=[T, F, T])), "2 names but 3 roles"),
    (json.dumps(good_row(solution=[T, T])), "does not satisfy the statement of person 0"),
    (json.dumps(good_row(statements="(('lying', 5), ('lying', 0))")), "person 5 out of range"),
    # the reward grades against solution_text_format: it must say what solution says
    (json.dumps(good_row(solution_text_format="(1) Zoey is a knight\n(2) Oliver is a knight")),
     "field 'solution_text_format' is '(1) Zoey is a knight\\n(2) Oliver is a knight', but names and solution say"),
    (json.dumps(good_row(solution_text="Zoey is a knight, and Oliver is a knight.")), "field 'solution_text' is"),
    (json.dumps(good_row(names=["Zoey", "Zoe"])), "must be distinct and each must occur in the quiz"),
    (json.dumps(good_row(names=["Zoey", "Zoey"])), "must be distinct"),
    (json.dumps(good_row()), "a duplicate of line 1"),
])
def test_load_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path, [json.dumps(good_row()), "", bad_line])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        kk_data.load_jsonl(path)


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(good_row()).encode() + b"\n" + b'{"quiz": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text")):
        kk_data.load_jsonl(path)


def test_a_truncated_last_line_is_dropped_with_a_warning_only_when_asked(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # a writer killed mid-line
    assert kk_data.read_jsonl(path, dict, truncated_tail_ok=True) == [{"step": 1}, {"step": 2}]
    assert f"warning: {path}:3: dropped a truncated last line" in capsys.readouterr().err
    with pytest.raises(ValueError, match=":3: invalid JSON"):
        kk_data.read_jsonl(path, dict)
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}')  # a broken line that is not the last one
    with pytest.raises(ValueError, match=":2: invalid JSON"):
        kk_data.read_jsonl(path, dict, truncated_tail_ok=True)
    path.write_text('{"step": 1}\n{"step": 2}')  # a whole last line without its newline is kept
    assert kk_data.read_jsonl(path, dict, truncated_tail_ok=True) == [{"step": 1}, {"step": 2}]


def test_save_jsonl_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "rows.jsonl"
    kk_data.save_jsonl(sample_records(), path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        kk_data.save_jsonl([sample_records()[0], {"not json": object()}], path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_check_writable_refuses_before_creating_anything(tmp_path):
    (tmp_path / "a_file").write_text("x")
    kk_data.check_writable(tmp_path / "new" / "deeper" / "out.json")  # parents may be missing: made on write
    kk_data.check_writable(tmp_path / "new" / "run", folder=True)
    with pytest.raises(ValueError, match="a_file is a file, not a folder"):
        kk_data.check_writable(tmp_path / "a_file" / "out.json")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        kk_data.check_writable(tmp_path / "a_file", folder=True)
    with pytest.raises(ValueError, match="is a folder, not a file"):
        kk_data.check_writable(tmp_path, folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("text", ["3-2", "x", "1-2-3", "", "3,", "-3"])
def test_parse_sizes_refuses_what_is_not_a_size_list(text):
    with pytest.raises(ValueError, match="sizes are written"):
        kk_data.parse_sizes(text)


@pytest.mark.parametrize("text, message", [
    ("(('lying', 0),", "not a Python literal"),
    ("[('lying', 1), ('lying', 0)]", "non-empty tuple"),
    ("(('maybe', 1), ('lying', 0))", "unknown operator 'maybe'"),
    ("(('->', ('lying', 1)), ('lying', 0))", "wrong number of operands"),
])
def test_parse_statements_rejects_malformed_text(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kk_data.parse_statements(text)


def test_parse_statements_inverts_str():
    statements = kk_data.sample_puzzle(random.Random(5), 7)
    assert kk_data.parse_statements(str(statements)) == statements


# ---- prompts ----------------------------------------------------------------------------------------------


RECORD = {"quiz": "You meet 2 inhabitants: Zoey, and Oliver. So who is a knight and who is a knave?"}


def test_instruct_prompt_is_byte_exact():
    expected = (
        "<|im_start|>system\nYou are a helpful assistant. The assistant first thinks about the reasoning process "
        "in the mind and then provides the user with the answer. The reasoning process and answer are enclosed "
        "within <think> </think> and<answer> </answer> tags, respectively, i.e., <think> reasoning process here "
        "</think><answer> answer here </answer>.  Now the user asks you to solve a logical reasoning problem. "
        "After thinking, when you finally reach a conclusion, clearly state the identity of each character "
        "within <answer> </answer> tags. i.e., <answer> (1) Zoey is a knight\n(2) ... </answer>.\n<|im_end|>\n"
        "<|im_start|>user\nYou meet 2 inhabitants: Zoey, and Oliver. So who is a knight and who is a knave?\n"
        "<|im_end|>\n<|im_start|>assistant\n<think>"
    )
    assert kk_data.make_prompt(RECORD, "qwen-instruct") == expected


def test_base_prompt_is_byte_exact():
    expected = (
        "The user asks a question, and the Assistant solves it.The assistant first thinks about the reasoning "
        "process in the mind and then provides the user with the final answer. The reasoning process and answer "
        "are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
        "process here </think><answer> answer here </answer>. Now the user asks you to solve a logical "
        "reasoning problem. After thinking, when you finally reach a conclusion, clearly state the identity of "
        "each character within <answer> </answer> tags. List the identity of each person one by one, for "
        "example, <answer> (1) Zoey is a knight\n(2) Oliver is a knight\n(3)... </answer>.\n\n"
        "User:You meet 2 inhabitants: Zoey, and Oliver. So who is a knight and who is a knave?\nAssistant: <think>"
    )
    assert kk_data.make_prompt(RECORD, "base") == expected


def test_tiny_prompt_is_quiz_then_think():
    assert kk_data.make_prompt(RECORD, "tiny") == RECORD["quiz"] + "\n<think>"


class QwenLikeTokenizer:
    """Stands in for Qwen2.5's chat template (no download needed)."""

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n"


def test_chat_prompt_with_qwens_template_equals_the_instruct_prompt():
    assert kk_data.make_prompt(RECORD, "chat", QwenLikeTokenizer()) == kk_data.make_prompt(RECORD, "qwen-instruct")


def test_prompt_errors():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        kk_data.make_prompt(RECORD, "chat")
    with pytest.raises(ValueError, match="qwen-instruct.*base.*chat.*tiny"):
        kk_data.make_prompt(RECORD, "llama")


def test_every_template_contains_the_quiz_verbatim():
    for r in sample_records():
        for template in kk_data.TEMPLATES:
            prompt = kk_data.make_prompt(r, template, QwenLikeTokenizer())
            assert r["quiz"] in prompt and prompt.endswith("<think>")


# ---- training targets -------------------------------------------------------------------------------------


@pytest.mark.exercise(1)
def test_local_trace_of_a_hand_worked_puzzle():
    # Zoey: "If Zoey is a knight then Oliver is a knave"; Oliver: "Zoey is a knight if and only if Zoey is a knave".
    record = {"names": ["Zoey", "Oliver"],
              "statements": str((("->", ("telling-truth", 0), ("lying", 1)),
                                 ("<=>", ("telling-truth", 0), ("lying", 0))))}
    assert kk_data.local_trace(record) == (
        "try Zoey knight Oliver knight : Zoey knight says if Zoey knight T then Oliver knave F = F bad ; "
        "try Zoey knight Oliver knave : Zoey knight says if Zoey knight T then Oliver knave T = T ok ; "
        "Oliver knave says Zoey knight T iff Zoey knave F = F ok ;"
    )


@pytest.mark.exercise(1)
def test_local_trace_writes_not_and_or():
    statements = (("not", ("lying", 1)), ("or", ("lying", 0), ("telling-truth", 1)))
    record = {"names": ["Ava", "Jack"], "statements": str(statements)}
    # Knight/knight: Ava says Jack is not a knave (true: ok); Jack says Ava knave (F) or Jack knight (T) = T: ok.
    assert kk_data.local_trace(record) == ("try Ava knight Jack knight : Ava knight says not Jack knave F = T ok ; "
                                           "Jack knight says Ava knave F or Jack knight T = T ok ;")


@pytest.mark.exercise(1)
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_local_trace_ends_on_the_solution(n):
    for r in kk_data.generate(n, 10, seed=n):
        last_try = kk_data.local_trace(r).split("try ")[-1]
        roles = re.findall(r"(knight|knave)", last_try.split(" : ")[0])
        assert roles == ["knight" if k else "knave" for k in r["solution"]]
        assert last_try.count(" ok ;") == n and " bad ;" not in last_try


def test_sft_completion_is_well_formed_for_the_reward():
    for r in kk_data.generate(3, 10, seed=1) + sample_records():
        for style in kk_data.SFT_STYLES:
            text = "<think>" + kk_data.sft_completion(r, style)
            tags = ["<think>", "</think>", "<answer>", "</answer>"]
            assert [text.count(tag) for tag in tags] == [1, 1, 1, 1]
            assert [text.index(tag) for tag in tags] == sorted(text.index(tag) for tag in tags)
            answer = text.split("<answer>")[1].split("</answer>")[0].strip()
            assert answer == r["solution_text_format"]


def test_sft_completion_styles():
    r = sample_records()[0]
    assert kk_data.sft_completion(r, "cot").startswith(" " + r["cot_head"] + " " + r["cot_repeat_steps"][0])
    assert kk_data.sft_completion(r, "trace").startswith(" " + kk_data.local_trace(r) + " </think>\n")
    assert kk_data.sft_completion(r, "answer") == f" </think>\n<answer> {r['solution_text_format']} </answer>"
    with pytest.raises(ValueError, match="trace.*cot.*answer"):
        kk_data.sft_completion(r, "essay")


def test_corpus_covers_every_word_of_prompts_and_completions():
    vocabulary = {w for text in kk_data.corpus_text() for w in WORDS.findall(text)}
    records = [r for n in range(2, 9) for r in kk_data.generate(n, 40, seed=100 + n)] + sample_records()
    for r in records:
        texts = [kk_data.make_prompt(r, t) for t in kk_data.TEMPLATES if t != "chat"]
        texts += [kk_data.sft_completion(r, style) for style in ("trace", "cot")]
        missing = {w for text in texts for w in WORDS.findall(text)} - vocabulary
        assert not missing, f"words missing from corpus_text(): {sorted(missing)}"


# ---- command line -----------------------------------------------------------------------------------------


def test_command_line_writes_train_and_test_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "kk_data.py"), "--people", "3-4", "--train", "6", "--test", "4",
                    "--seed", "1", "--out", str(tmp_path)], check=True, capture_output=True)
    for n in (3, 4):
        train = kk_data.load_jsonl(tmp_path / "train" / f"people{n}_num6.jsonl")
        test = kk_data.load_jsonl(tmp_path / "test" / f"people{n}_num4.jsonl")
        assert len(train) == 6 and len(test) == 4
        assert not {r["statements"] for r in train} & {r["statements"] for r in test}
