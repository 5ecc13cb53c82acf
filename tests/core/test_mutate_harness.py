"""The mutation-testing harness (tools/mutate.py) plants the mutants it claims, skips what it
claims to skip, and a planted bug in a tiny package is killed by a tiny test."""

from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_harness() -> ModuleType:
    # tools/ is not a package: load the script by its path (registered first, as dataclasses
    # look their module up in sys.modules)
    spec = importlib.util.spec_from_file_location("emacore_mutate", ROOT / "tools" / "mutate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mutate = _load_harness()

SOURCE = textwrap.dedent(
    '''\
    """A module docstring, 1 + 1."""
    from typing import TYPE_CHECKING

    if TYPE_CHECKING:
        LIMIT = 3 + 4
    __all__ = ["f"]
    SIZE = 8


    def f(a: int = 0, b: "list[int] | None" = None) -> int:
        """A docstring, 2 * 3."""
        if b is None:
            raise ValueError(f"b must not be None, a={a + 1}")
        total = a * 2
        total += min(b)
        assert total is not None
        if a < 3 and not b:
            return -total
        return total  # pragma: no mutate
    '''
)

# (line, kind, description) of every mutant SOURCE must get, in planting order
EXPECTED = [
    (7, "constant", "`8` → `9`"),
    (10, "constant", "`0` → `1`"),
    (12, "if-false", "if-guard removed: condition → `False`"),
    (12, "compare", "`is` → `is not`"),
    (13, "remove-raise", "`raise` removed"),
    (14, "binop", "`*` → `/`"),
    (14, "constant", "`2` → `3`"),
    (15, "remove-stmt", "statement removed"),
    (15, "augassign", "`+=` → `-=`"),
    (15, "min-max", "`min` → `max`"),
    (17, "if-false", "if-guard removed: condition → `False`"),
    (17, "boolop", "`and` → `or`"),
    (17, "compare", "`<` → `<=`"),
    (17, "constant", "`3` → `4`"),
    (17, "unary", "`not` removed"),
    (18, "return-none", "return value → `None`"),
    (18, "unary", "`-` removed"),
]


def test_plants_the_mutants_it_claims() -> None:
    got = [(m.line, m.kind, m.description) for m in mutate.plant("m.py", SOURCE)]
    assert got == EXPECTED


@pytest.mark.parametrize(
    ("line", "before", "after"),
    [
        (12, "if b is None:", "if b is not None:"),
        (14, "total = a * 2", "total = a / 2"),
        (15, "total += min(b)", "pass"),
        (17, "if a < 3 and not b:", "if a < 3 or not b:"),
        (18, "return -total", "return None"),
    ],
)
def test_a_mutant_changes_exactly_its_line(line: int, before: str, after: str) -> None:
    source = SOURCE.encode()
    mutants = [m for m in mutate.plant("m.py", SOURCE) if m.line == line]
    diffs = [m.diff(source) for m in mutants]
    assert [(before, after)] in diffs


def test_nothing_is_planted_in_docstrings_annotations_messages_or_marked_lines() -> None:
    lines = {m.line for m in mutate.plant("m.py", SOURCE)}
    # the docstrings, TYPE_CHECKING, __all__, the assert and the pragma'd return
    assert lines.isdisjoint({1, 4, 5, 6, 11, 16, 19})
    # line 10's only mutant is its default value, never its annotations
    assert [m.description for m in mutate.plant("m.py", SOURCE) if m.line == 10] == ["`0` → `1`"]


def test_scopes_restrict_the_mutants() -> None:
    source = (
        "def f(x):\n    return x + 1\n\n\nclass C:\n    def g(self, x):\n        return x - 1\n"
    )
    scoped = mutate.plant("m.py", source, scopes=("C.g",))
    assert {m.scope for m in scoped} == {"C.g"}
    assert len(mutate.plant("m.py", source, scopes=("C",))) == len(scoped)


@pytest.mark.parametrize("target", mutate.TARGETS, ids=lambda t: t.name)
def test_every_mutant_of_the_targets_parses_and_changes_its_line(target: Any) -> None:
    source = (ROOT / target.path).read_bytes()
    mutants = mutate.plant(target.path, source.decode(), target.scopes)
    assert mutants, f"{target.path}: nothing planted"
    original = ast.dump(ast.parse(source))
    for m in mutants:
        assert ast.dump(ast.parse(m.apply(source))) != original, m.ident
        assert m.diff(source), m.ident


def test_a_seeded_sample_is_reproducible_and_in_source_order() -> None:
    mutants = mutate.plant("m.py", SOURCE)
    first = mutate.select(mutants, limit=None, sample=5, seed=3)
    assert first == mutate.select(mutants, limit=None, sample=5, seed=3)
    assert len(first) == 5
    assert first == sorted(first, key=mutants.index)


TINY_MODULE = """\
def add(a, b):
    return a + b


def untested(a):
    return a * 2
"""

TINY_TEST = """\
from tiny.calc import add


def test_add():
    assert add(2, 3) == 5
"""


def _tiny_project(root: Path, test: str = TINY_TEST) -> None:
    (root / "src" / "tiny").mkdir(parents=True)
    (root / "src" / "tiny" / "__init__.py").write_text("")
    (root / "src" / "tiny" / "calc.py").write_text(TINY_MODULE)
    (root / "tests").mkdir()
    (root / "tests" / "test_calc.py").write_text(test)
    (root / "pytest.ini").write_text("[pytest]\n")  # the tiny project is its own rootdir


def _tiny_run(root: Path) -> dict[str, str]:
    runner = mutate.Runner(root, pytest_args=("-x", "-q", "-p", "no:cacheprovider"))
    target = mutate.Target("calc", "src/tiny/calc.py", ("tests/test_calc.py",))
    mutants = [
        m
        for m in mutate.plant(target.path, TINY_MODULE)
        if m.kind == "binop"  # `a + b` → `a - b` (tested) and `a * 2` → `a / 2` (not)
    ]
    stages = [mutate.Stage(("tests/test_calc.py",))]
    results = mutate.run_target(runner, target, mutants, stages, log=lambda _: None)
    return {m.scope: outcome.status for m, outcome in results}


def test_a_planted_bug_is_killed_and_an_untested_one_survives(tmp_path: Path) -> None:
    _tiny_project(tmp_path)
    assert _tiny_run(tmp_path) == {"add": "killed", "untested": "survived"}
    # the original module is untouched after the run
    assert (tmp_path / "src" / "tiny" / "calc.py").read_text() == TINY_MODULE


def test_tests_that_bypass_the_copy_are_refused(tmp_path: Path) -> None:
    # a test that imports the original source, not the mutated copy: every mutant would
    # "survive", so the canary must stop the run
    bypass = (
        "import sys, pathlib\nsys.path.insert(0, str(pathlib.Path(__file__).parents[1] / 'src'))\n"
    )
    _tiny_project(tmp_path, bypass + TINY_TEST)
    with pytest.raises(mutate.HarnessError, match="do not import the mutated copy"):
        _tiny_run(tmp_path)


def test_the_report_lists_scores_and_survivors() -> None:
    source = SOURCE.encode()
    killed, survived = mutate.plant("m.py", SOURCE)[:2]
    results = {
        "m": [
            (killed, mutate.Outcome("killed", 1.0)),
            (survived, mutate.Outcome("survived", 2.0)),
        ]
    }
    report = mutate.render(results, {"m.py": source}, "header")
    assert "| m | 2 | 1 | 0 | 1 | 50.0% |" in report
    assert "m.py:10" in report and "`- def f(a: int = 0" in report
