"""Write a student copy of this repository: every exercise's function body replaced by NotImplementedError.

    python exercises/make.py OUT_DIR          # OUT_DIR must not exist yet (or be an empty folder)

The solutions stay where they are. A comment line directly above a module-level `def` marks an exercise:

    # exercise 5: group advantages (GRPO, Dr. GRPO, RLOO)
    def group_advantages(rewards, group_size, estimator="grpo", eps=1e-6):
        \"\"\"...the docstring stays: it is the task...\"\"\"
        ...                                      <- these lines become
                                                    raise NotImplementedError("exercise 5: group advantages ...")

The copy holds the files git would commit (tracked, plus untracked ones that .gitignore does not exclude; without
git: everything but .git, .venv, runs/, data/ and caches), minus tests/test_exercises.py (it checks the teacher's
repository, not a student's). The Logic-RL / OREO specs and reference data of ../shared go into OUT_DIR/shared, which
tests/conftest.py prefers, so the copy is self-contained. Its README.md is exercises/README.md (how to check one
exercise and all of them); the project's own README becomes README_PROJECT.md.
"""
import ast
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"# exercise (\d+): (\S.*?)\s*$")
SKIP_PARTS = {".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache", ".hypothesis", ".whl"}
LEFT_OUT = {"tests/test_exercises.py"}
SHARED_PARTS = ("spec", "data", "research")  # what of ../shared the copy carries


@dataclass(frozen=True)
class Exercise:
    number: int
    title: str
    path: str  # the file, relative to the repository root
    function: str  # a module-level function of that file
    first_line: int  # 1-based: the first line to blank (just after the docstring)
    last_line: int  # 1-based, inclusive: the function's last line
    indent: int  # columns of indentation of the function's body

    def message(self):
        return f"exercise {self.number}: {self.title}"


def function_end(lines, node):
    """The function's last line, counting comment lines indented under it that follow its last statement."""
    end, indent = node.end_lineno, node.col_offset
    for k in range(node.end_lineno, len(lines)):  # lines[k] is line k + 1
        text = lines[k]
        if text.strip().startswith("#") and len(text) - len(text.lstrip()) > indent:
            end = k + 1
        elif text.strip():
            break
    return end


def exercises_in(source, path):
    """The exercises marked in one file's source; ValueError for a marker that marks no documented function."""
    lines = source.splitlines()
    found = []
    marked_lines = set()
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        match = MARKER.fullmatch(lines[first - 2].strip()) if first >= 2 else None
        if match is None:
            continue
        marked_lines.add(first - 1)
        docstring = node.body[0]
        if not (isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
                and isinstance(docstring.value.value, str)) or len(node.body) < 2:
            raise ValueError(f"{path}:{node.lineno}: exercise {match[1]} ({node.name}) needs a docstring and a body "
                             f"after it: the docstring is what the student is given")
        found.append(Exercise(int(match[1]), match[2], path, node.name, docstring.end_lineno + 1,
                              function_end(lines, node), docstring.col_offset))
    for k, text in enumerate(lines, start=1):
        if MARKER.fullmatch(text.strip()) and k not in marked_lines:
            raise ValueError(f"{path}:{k}: an exercise marker must sit on the line directly above a module-level def")
    return found


def candidate_files(root):
    """The repository's files as relative paths: what git would commit, or a plain walk without git."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True, text=True).stdout.split("\0")
        files = [name for name in listed if name and (root / name).is_file()]
    except (OSError, subprocess.CalledProcessError):  # no git, or not a repository: skip what .gitignore lists
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                 and not SKIP_PARTS & set(p.relative_to(root).parts) and p.suffix != ".pyc"]
    return sorted(name for name in set(files) if name not in LEFT_OUT)


def find_exercises(root=ROOT):
    """Every marked exercise of the repository's Python files, by number; ValueError on a repeated number."""
    exercises = []
    for name in candidate_files(root):
        if name.endswith(".py") and not name.startswith("exercises/"):
            exercises += exercises_in((root / name).read_text(), name)
    exercises.sort(key=lambda e: e.number)
    numbers = [e.number for e in exercises]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"exercise numbers repeat: {numbers}")
    return exercises


def blank(source, exercises):
    """The source with each exercise's body (after its docstring) replaced by `raise NotImplementedError(...)`."""
    lines = source.splitlines(keepends=True)
    for exercise in sorted(exercises, key=lambda e: -e.first_line):  # bottom up: earlier line numbers stay valid
        blanked = " " * exercise.indent + f"raise NotImplementedError({exercise.message()!r})\n"
        lines[exercise.first_line - 1: exercise.last_line] = [blanked]
    return "".join(lines)


def make_student_copy(out, root=ROOT):
    """Write the student copy into `out` (a new or empty folder); returns the exercises it blanked."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; give a new folder for the student copy")
    exercises = find_exercises(root)
    by_file = {}
    for exercise in exercises:
        by_file.setdefault(exercise.path, []).append(exercise)
    for name in candidate_files(root):
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in by_file:
            target.write_text(blank((root / name).read_text(), by_file[name]))
        else:
            shutil.copy2(root / name, target)
    shared = root.parent / "shared"
    for part in SHARED_PARTS:
        if (shared / part).is_dir():
            shutil.copytree(shared / part, out / "shared" / part)
    if (out / "README.md").exists():
        (out / "README.md").rename(out / "README_PROJECT.md")
    shutil.copy2(root / "exercises" / "README.md", out / "README.md")
    return exercises


def main(argv):
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.exit("usage: python exercises/make.py OUT_DIR")
    try:
        exercises = make_student_copy(argv[0])
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"student copy in {argv[0]}: {len(exercises)} exercises blanked")
    for e in exercises:
        print(f"  {e.number:2d}. {e.path}:{e.function} - {e.title}")
    print(f"check one: cd {argv[0]} && python -m pytest -m exercise -k ex01;  all: python -m pytest -m exercise")


if __name__ == "__main__":
    main(sys.argv[1:])
