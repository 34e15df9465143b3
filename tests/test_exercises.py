"""exercises/make.py and the exercise markers (exercises/README.md): in a student copy every exercise test fails,
naming its own exercise, and putting one function body back makes exactly that exercise's tests pass.

The copy's test runs are limited to `-m exercise` in the test files that hold exercise tests, to stay short."""
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "exercises"))
import make  # noqa: E402

EXERCISES = make.find_exercises()
BY_NUMBER = {e.number: e for e in EXERCISES}
FAST_RESTORE = 8  # grpo.aggregate: grpo.py holds six exercises, and only this body goes back


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("exercises") / "student"
    done = subprocess.run([sys.executable, str(ROOT / "exercises" / "make.py"), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def run_exercise_tests(root, report, *select):
    """Run `pytest -m exercise [select...]` in `root`; {test id: (exercise number, passed, failure text)}."""
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                   if "@pytest.mark.exercise(" in p.read_text())
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "exercise", "-p", "no:cacheprovider",
                    f"--junitxml={report}", *select, *files], cwd=root, capture_output=True, text=True, timeout=600)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        number = int(case.find("properties/property[@name='exercise']").get("value"))
        problems = [child for child in case if child.tag in ("failure", "error", "skipped")]
        text = " ".join(f"{child.get('message', '')} {child.text or ''}" for child in problems)
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = (number, not problems, text)
    return outcomes


def restored(source, exercise):
    """A student file's source with the original body of one exercise put back: what the student writes."""
    lines = source.splitlines(keepends=True)
    (blank,) = [e for e in make.exercises_in(source, exercise.path) if e.number == exercise.number]
    original = (ROOT / exercise.path).read_text().splitlines(keepends=True)
    lines[blank.first_line - 1: blank.last_line] = original[exercise.first_line - 1: exercise.last_line]
    return "".join(lines)


@pytest.fixture(scope="module")
def blank_run(student, tmp_path_factory):
    return run_exercise_tests(student, tmp_path_factory.mktemp("reports") / "blank.xml")


def test_markers_number_the_readmes_exercises_in_order():
    assert len(EXERCISES) >= 10
    assert [e.number for e in EXERCISES] == list(range(1, len(EXERCISES) + 1))
    readme = (ROOT / "exercises" / "README.md").read_text()
    headings = re.findall(r"^## Exercise (\d+): .*\(`(\w+)\.(\w+)`\)$", readme, flags=re.MULTILINE)
    assert headings == [(str(e.number), e.path.removesuffix(".py"), e.function) for e in EXERCISES]
    for e in EXERCISES:
        assert f"**Check:** `python -m pytest -m exercise -k ex{e.number:02d}`" in readme


def test_student_copy_blanks_exactly_the_exercise_bodies(student):
    for path in sorted({e.path for e in EXERCISES}):
        source = (student / path).read_text()
        in_copy = make.exercises_in(source, path)
        assert sorted(e.number for e in in_copy) == [e.number for e in EXERCISES if e.path == path]
        assert all(e.first_line == e.last_line for e in in_copy)  # one line left: the raise
        for exercise in in_copy:
            assert f"raise NotImplementedError({exercise.message()!r})" in source
            source = restored(source, BY_NUMBER[exercise.number])
        assert source == (ROOT / path).read_text()  # nothing else was changed


def test_student_copy_has_the_exercise_readme_and_no_private_files(student):
    assert (student / "README.md").read_text() == (ROOT / "exercises" / "README.md").read_text()
    assert (student / "README_PROJECT.md").read_text() == (ROOT / "README.md").read_text()
    assert not (student / "tests" / "test_exercises.py").exists()
    for skipped in (".git", ".venv", "runs", "__pycache__"):
        assert not list(student.rglob(skipped)), skipped
    with pytest.raises(ValueError, match="not empty"):
        make.make_student_copy(student)


def test_every_exercise_test_fails_in_the_student_copy_naming_its_exercise(blank_run):
    assert {number for number, _, _ in blank_run.values()} == set(BY_NUMBER)
    for test, (number, passed, text) in blank_run.items():
        assert not passed, f"{test} passes with exercise {number} blank"
        assert f"NotImplementedError: exercise {number}:" in text, f"{test} fails for another reason: {text[:300]}"


@pytest.mark.parametrize("number", [pytest.param(n, marks=[] if n == FAST_RESTORE else [pytest.mark.slow])
                                    for n in sorted(BY_NUMBER)])
def test_restoring_one_body_passes_exactly_that_exercises_tests(student, blank_run, tmp_path, number):
    """Only exercise `number`'s tests run here (`-k exNN`). The other exercises' tests still fail: in blank_run
    each of them stopped at its OWN exercise's raise, so it never called this body before failing there."""
    path = student / BY_NUMBER[number].path
    blanked = path.read_text()
    path.write_text(restored(blanked, BY_NUMBER[number]))
    try:
        outcomes = run_exercise_tests(student, tmp_path / "restored.xml", "-k", f"ex{number:02d}")
    finally:
        path.write_text(blanked)
    assert set(outcomes) == {test for test, (n, _, _) in blank_run.items() if n == number}
    for test, (test_number, passed, text) in outcomes.items():
        assert passed and test_number == number, f"{test} (exercise {test_number}): passed={passed} {text[:300]}"


def test_markers_must_sit_on_documented_module_level_functions():
    with pytest.raises(ValueError, match="x.py:2: .*directly above a module-level def"):
        make.exercises_in("def f():\n    # exercise 1: inside\n    return 1\n", "x.py")
    with pytest.raises(ValueError, match="x.py:2: exercise 1 .*needs a docstring"):
        make.exercises_in("# exercise 1: no docstring\ndef f():\n    return 1\n", "x.py")
    source = '# exercise 3: t\ndef f(x):\n    """Doc."""\n    y = x\n    return y\n    # a trailing note\n\n\nz = 1\n'
    (exercise,) = make.exercises_in(source, "x.py")
    assert make.blank(source, [exercise]) == ('# exercise 3: t\ndef f(x):\n    """Doc."""\n'
                                              "    raise NotImplementedError('exercise 3: t')\n\n\nz = 1\n")


def test_outside_git_the_copy_skips_what_gitignore_lists(tmp_path):
    for name in ("a.py", "assets/w.bin", "runs/r/metrics.jsonl", "__pycache__/a.pyc", ".venv/bin/python",
                 "data/kk/x.jsonl", "tests/test_exercises.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert make.candidate_files(tmp_path) == ["a.py", "assets/w.bin"]
