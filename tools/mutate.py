"""Mutation testing of emacore's core modules: plant one small bug at a time, run the fast tests.

Usage (from the repository root)::

    python tools/mutate.py --out build/mutation-report.md
    python tools/mutate.py --modules _kernel,_debias --sample 40 --seed 1 --jobs 2

Each mutant is one edit of one target module (an operator swapped, a comparison flipped, a
constant changed, a return value replaced by ``None``, a guard or a statement removed, ...).
For each, the mutated module is written into a private copy of ``src/`` that is put first on
``PYTHONPATH`` (the package is installed editable from ``src/``; ``PYTHONPATH`` entries come
before the editable install's ``.pth`` entry), and the module's test selection runs against it.
A mutant is *killed* when a test fails, *timeout* when the run outlives its limit (counted as
killed, reported apart), and *survived* when every test passes: a survivor is either an
equivalent mutant or a test we are missing.

Design invariants:

* Mutants are text edits at positions the ``ast`` gives, so the rest of the file (comments,
  layout) is untouched and a mutant's diff is the one line it changes.
* Nothing is mutated inside docstrings, annotations, f-strings, the message of a ``raise``,
  warning and logging calls, ``assert`` statements (they narrow types for mypy),
  ``if TYPE_CHECKING:`` blocks, ``__all__``, or on a line marked ``# pragma: no mutate``.
* Before any mutant runs, the unmutated copy must pass every test selection (the baseline), and
  a *canary* (the copy's module raising on import) must fail it: that proves the tests import
  the copy, the numpy backend included, which the plugin manager loads by module name.
* Each module's tests run in two stages, its own test files first and then the rest of the
  fast selection, both with ``-x``: most mutants die in the first seconds of stage one.
* No bytecode is written in the copy (``PYTHONDONTWRITEBYTECODE``): two mutants of the same size
  written in the same second would otherwise share a stale ``.pyc``.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import contextlib
import difflib
import io
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_MUTATE = "pragma: no mutate"

# The fast selection every mutant must survive to count as a survivor.
FAST_TESTS = ("tests/core", "tests/conformance")
# Never part of a mutant's run: this harness's own tests start pytest themselves.
ALWAYS_IGNORED = ("tests/core/test_mutate_harness.py",)
# Passed to every run: stop at the first failure, no cache writes into the shared tree, and
# hypothesis's built-in "ci" profile (derandomized, no example database, no deadline) so that a
# verdict is reproducible and a loaded machine cannot kill a mutant by a deadline.
PYTEST_ARGS = ("-x", "-q", "--tb=no", "-rfE", "-p", "no:cacheprovider", "--hypothesis-profile=ci")


# --------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Target:
    """One module to mutate, the part of it to mutate, and the tests that exercise it first.

    Parameters
    ----------
    name : str
        The short name used by ``--modules`` and in the report.
    path : str
        The module's path relative to the repository root (under ``src/``).
    tests : tuple of str
        Test files run first (stage one); the rest of the fast selection runs after them.
    scopes : tuple of str
        Qualified names (``"Class.method"``, ``"function"``) to restrict the mutants to;
        empty for the whole module.
    """

    name: str
    path: str
    tests: tuple[str, ...]
    scopes: tuple[str, ...] = ()


NUMPY_UPDATE_SCOPES = (
    "NumpyBackend.update",
    "NumpyBackend.update_lanes",
    "NumpyBackend._gather",
    "NumpyBackend._copy",
    "NumpyBackend._packed_plan",
    "NumpyBackend._loose_lanes",
    "NumpyBackend._balance",
    "NumpyBackend._run",
    "NumpyBackend._run_lane",
    "NumpyBackend._scratch",
    "_check_same",
    "_run_lanes",
    "_blocked_lanes",
    "_blocked",
)

TARGETS = (
    Target("_kernel", "src/emacore/_kernel.py", ("tests/core/test_numpy_backend.py",)),
    Target(
        "_debias",
        "src/emacore/_debias.py",
        ("tests/core/test_core.py", "tests/conformance/test_tf_parity.py"),
    ),
    Target(
        "schedules",
        "src/emacore/schedules.py",
        ("tests/core/test_schedules.py", "tests/core/test_core.py"),
    ),
    Target(
        "functional",
        "src/emacore/functional.py",
        (
            "tests/conformance/test_api.py",
            "tests/conformance/test_bad_input.py",
            "tests/conformance/test_properties.py",
        ),
    ),
    Target(
        "_state_dict",
        "src/emacore/_state_dict.py",
        ("tests/conformance/test_checkpoint.py", "tests/conformance/test_bad_input.py"),
    ),
    Target(
        "numpy",
        "src/emacore_backends/numpy.py",
        ("tests/core/test_numpy_backend.py", "tests/conformance/test_api.py"),
        NUMPY_UPDATE_SCOPES,
    ),
)


# --------------------------------------------------------------------------------------------
# Mutants


@dataclass(frozen=True)
class Edit:
    """Replace the bytes ``[start, end)`` of the module's UTF-8 source by ``text``."""

    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Mutant:
    """One planted bug: where it is, what it does, and the edits that make it.

    ``line`` is 1-based; ``scope`` is the qualified name of the enclosing function or class
    (``"<module>"`` at top level); ``kind`` names the mutation operator.
    """

    path: str
    line: int
    scope: str
    kind: str
    description: str
    edits: tuple[Edit, ...]

    def apply(self, source: bytes) -> bytes:
        """Return ``source`` with this mutant's edits made (edits never overlap)."""
        out = source
        for edit in sorted(self.edits, key=lambda e: e.start, reverse=True):
            out = out[: edit.start] + edit.text.encode() + out[edit.end :]
        return out

    def diff(self, source: bytes) -> list[tuple[str, str]]:
        """The changed lines as (before, after) pairs, stripped, for the report."""
        old = source.decode().splitlines()
        new = self.apply(source).decode().splitlines()
        pairs: list[tuple[str, str]] = []
        matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
        for tag, a0, a1, b0, b1 in matcher.get_opcodes():
            if tag != "equal":
                before = " ⏎ ".join(s.strip() for s in old[a0:a1])
                after = " ⏎ ".join(s.strip() for s in new[b0:b1])
                pairs.append((before, after))
        return pairs

    @property
    def ident(self) -> str:
        """A stable name: module path, line, operator, and the first edit's byte offset."""
        return f"{self.path}:{self.line}:{self.kind}@{self.edits[0].start}"


# ast operator -> (its token, the token it becomes)
BINOP_SWAPS: dict[type[ast.operator], tuple[str, str]] = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "/"),
    ast.Div: ("/", "*"),
    ast.FloorDiv: ("//", "/"),
    ast.Mod: ("%", "//"),
    ast.Pow: ("**", "*"),
}
# ordering comparisons move their boundary; equality, identity and membership are negated
COMPARE_SWAPS: dict[type[ast.cmpop], tuple[str, str]] = {
    ast.Lt: ("<", "<="),
    ast.LtE: ("<=", "<"),
    ast.Gt: (">", ">="),
    ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
    ast.Is: ("is", "is not"),
    ast.IsNot: ("is not", "is"),
    ast.In: ("in", "not in"),
    ast.NotIn: ("not in", "in"),
}
# the message of these calls is text for people, not behaviour
MESSAGE_CALLS = frozenset({"warn", "debug", "info", "warning", "error", "exception", "critical"})


def _number_variants(value: float) -> list[object]:
    """The numbers a numeric constant is mutated into: 0→1, 1→0 and 2, x→x+1."""
    if isinstance(value, bool):
        return [not value]
    if value == 0:
        return [type(value)(1)]
    if value == 1:
        return [type(value)(0), type(value)(2)]
    return [value + 1]


class _Source:
    """A module's source with the position arithmetic the planter needs (bytes, tokens)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.data = text.encode()
        self.lines = text.splitlines(keepends=True)
        self.line_starts = [0]
        for line in self.lines:
            self.line_starts.append(self.line_starts[-1] + len(line.encode()))
        # (byte offset, byte end, string) of every operator and name token, in order
        self.tokens: list[tuple[int, int, str]] = []
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.OP, tokenize.NAME):
                self.tokens.append(
                    (self._char_pos(*tok.start), self._char_pos(*tok.end), tok.string)
                )
        self.token_starts = [t[0] for t in self.tokens]

    def _char_pos(self, line: int, col: int) -> int:
        """Byte offset of a (line, character column) position, as tokenize reports them."""
        if line > len(self.lines):
            return len(self.data)
        return self.line_starts[line - 1] + len(self.lines[line - 1][:col].encode())

    def pos(self, line: int, col: int) -> int:
        """Byte offset of a (line, UTF-8 byte column) position, as ast reports them."""
        return self.line_starts[line - 1] + col

    def span(self, node: ast.AST) -> tuple[int, int]:
        """The byte span of an expression or statement node."""
        start = self.pos(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = self.pos(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        return start, end

    def find_tokens(self, lo: int, hi: int, words: Sequence[str]) -> tuple[int, int] | None:
        """The span of the first run of tokens spelling ``words`` within ``[lo, hi)``."""
        i = bisect.bisect_left(self.token_starts, lo)
        while i + len(words) <= len(self.tokens) and self.tokens[i][0] < hi:
            run = self.tokens[i : i + len(words)]
            if [t[2] for t in run] == list(words) and run[-1][1] <= hi:
                return run[0][0], run[-1][1]
            i += 1
        return None

    def line_of(self, offset: int) -> int:
        """The 1-based line holding a byte offset."""
        return bisect.bisect_right(self.line_starts, offset)


def _is_docstring(stmt: ast.stmt) -> bool:
    """A docstring, or any other bare constant statement (``...`` in a protocol body)."""
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_message_call(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in MESSAGE_CALLS


def _names_all(targets: Iterable[ast.expr]) -> bool:
    return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


class _Planter(ast.NodeVisitor):
    """Walks a module's tree and records every mutant the operators allow, in source order."""

    def __init__(self, path: str, source: _Source) -> None:
        self.path = path
        self.src = source
        self.mutants: list[Mutant] = []
        self.scope: list[str] = []
        # per enclosing function: names bound before a line (parameters, earlier assignments)
        self.functions: list[ast.FunctionDef | ast.AsyncFunctionDef] = []

    # -- recording ----------------------------------------------------------------------------

    def _add(self, kind: str, description: str, *edits: Edit) -> None:
        line = self.src.line_of(edits[0].start)
        if NO_MUTATE in self.src.lines[line - 1]:
            return
        scope = ".".join(self.scope) or "<module>"
        self.mutants.append(Mutant(self.path, line, scope, kind, description, edits))

    def _replace(self, node: ast.AST, text: str, kind: str, description: str) -> None:
        start, end = self.src.span(node)
        self._add(kind, description, Edit(start, end, text))

    def _swap_token(self, lo: int, hi: int, old: str, new: str, kind: str) -> None:
        found = self.src.find_tokens(lo, hi, old.split())
        if found is not None:
            self._add(kind, f"`{old}` → `{new}`", Edit(found[0], found[1], new))

    # -- scopes and skipped regions -----------------------------------------------------------

    def _visit_body(self, body: list[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            if i == 0 and _is_docstring(stmt):
                continue
            self.visit(stmt)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for deco in node.decorator_list:
            self.visit(deco)
        self.scope.append(node.name)
        self._visit_body(node.body)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_function(node)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        # decorators and default values are behaviour; annotations are not visited
        for deco in node.decorator_list:
            self.visit(deco)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        self.scope.append(node.name)
        self.functions.append(node)
        self._visit_body(node.body)
        self.functions.pop()
        self.scope.pop()

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        """f-strings are messages: nothing inside is mutated."""

    def visit_Assert(self, node: ast.Assert) -> None:
        """Asserts narrow types for mypy here; mutating them only plants noise."""

    def visit_Call(self, node: ast.Call) -> None:
        if _is_message_call(node):
            self.visit(node.func)
            return
        if isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            new = "max" if node.func.id == "min" else "min"
            self._replace(node.func, new, "min-max", f"`{node.func.id}` → `{new}`")
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._maybe_remove(node)
            self.visit(node.value)

    def visit_Assign(self, node: ast.Assign) -> None:
        if _names_all(node.targets):
            return
        self._maybe_remove(node)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if _names_all([node.target]):
            return
        self._maybe_remove(node)
        swap = BINOP_SWAPS.get(type(node.op))
        if swap is not None:
            lo, hi = self.src.span(node.target)[1], self.src.span(node.value)[0]
            self._swap_token(lo, hi, swap[0] + "=", swap[1] + "=", "augassign")
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        self._maybe_remove(node)
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        # the exception raised and its message are not mutated, only whether it is raised
        if self.functions:
            self._replace(node, "pass", "remove-raise", "`raise` removed")

    def visit_Return(self, node: ast.Return) -> None:
        value = node.value
        if value is not None and not (isinstance(value, ast.Constant) and value.value is None):
            self._replace(value, "None", "return-none", "return value → `None`")
            self.visit(value)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            return
        guard = "if-guard removed" if not node.orelse else "else-branch forced"
        self._replace(node.test, "False", "if-false", f"{guard}: condition → `False`")
        if node.orelse:
            self._replace(node.test, "True", "if-true", "if-branch forced: condition → `True`")
        self.visit(node.test)
        self._visit_body(node.body)
        self._visit_body(node.orelse)

    # -- expressions --------------------------------------------------------------------------

    def visit_BinOp(self, node: ast.BinOp) -> None:
        swap = BINOP_SWAPS.get(type(node.op))
        if swap is not None and not _is_text(node):
            lo, hi = self.src.span(node.left)[1], self.src.span(node.right)[0]
            self._swap_token(lo, hi, *swap, kind="binop")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:]):
            swap = COMPARE_SWAPS[type(op)]
            lo, hi = self.src.span(left)[1], self.src.span(right)[0]
            self._swap_token(lo, hi, *swap, kind="compare")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        edits = []
        for left, right in zip(node.values, node.values[1:]):
            found = self.src.find_tokens(self.src.span(left)[1], self.src.span(right)[0], [old])
            if found is not None:
                edits.append(Edit(found[0], found[1], new))
        if edits:
            self._add("boolop", f"`{old}` → `{new}`", *edits)
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, (ast.Not, ast.USub)):
            word = "not" if isinstance(node.op, ast.Not) else "-"
            start = self.src.span(node)[0]
            found = self.src.find_tokens(start, self.src.span(node.operand)[0], [word])
            if found is not None:
                self._add("unary", f"`{word}` removed", Edit(found[0], found[1], ""))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, (bool, int, float)):
            for new in _number_variants(value):
                self._replace(node, repr(new), "constant", f"`{value!r}` → `{new!r}`")

    # -- statement removal --------------------------------------------------------------------

    def _maybe_remove(self, node: ast.stmt) -> None:
        """Plant "statement removed" for statements in a function body that do something.

        An assignment that first binds a plain name is left alone: removing it can only raise
        ``NameError``, which every test that reaches it kills, at the cost of a test run.
        """
        if not self.functions or _is_docstring(node):
            return
        if isinstance(node, ast.Assign) and not self._rebinds(node.targets, node.lineno):
            return
        if isinstance(node, ast.AnnAssign) and not self._rebinds([node.target], node.lineno):
            return
        self._replace(node, "pass", "remove-stmt", "statement removed")

    def _rebinds(self, targets: Sequence[ast.expr], line: int) -> bool:
        """Whether the assignment writes through an object or rebinds an already bound name."""
        if any(not isinstance(t, ast.Name) for t in targets):
            return True
        func = self.functions[-1]
        bound = {a.arg for a in [*func.args.posonlyargs, *func.args.args, *func.args.kwonlyargs]}
        for sub in ast.walk(func):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store) and sub.lineno < line:
                bound.add(sub.id)
        return all(isinstance(t, ast.Name) and t.id in bound for t in targets)


def _is_text(node: ast.BinOp) -> bool:
    """A string concatenation or %-format: a message, not arithmetic."""
    sides = (node.left, node.right)
    return any(
        isinstance(s, ast.JoinedStr) or (isinstance(s, ast.Constant) and isinstance(s.value, str))
        for s in sides
    )


def _in_scope(mutant: Mutant, scopes: Sequence[str]) -> bool:
    return not scopes or any(mutant.scope == s or mutant.scope.startswith(s + ".") for s in scopes)


def plant(path: str, text: str, scopes: Sequence[str] = ()) -> list[Mutant]:
    r"""Every mutant of one module's source, in source order.

    Parameters
    ----------
    path : str
        The module's path, recorded in each mutant.
    text : str
        The module's source.
    scopes : sequence of str
        Qualified names to restrict the mutants to (a class name covers its methods);
        empty for the whole module.

    Returns
    -------
    list of Mutant
        Each one parses; none changes only a docstring, an annotation or a message.

    Examples
    --------
    >>> [m.description for m in plant("m.py", "def f(a, b):\n    return a + b\n")]
    ['return value → `None`', '`+` → `-`']
    """
    planter = _Planter(path, _Source(text))
    tree = ast.parse(text)
    planter._visit_body(tree.body)
    data, original = text.encode(), ast.dump(tree)
    return [m for m in planter.mutants if _in_scope(m, scopes) and _changes_code(data, original, m)]


def _changes_code(source: bytes, original: str, mutant: Mutant) -> bool:
    """A mutant must parse and change the module's tree (a safety net for the planter)."""
    try:
        tree = ast.parse(mutant.apply(source))
    except SyntaxError:
        return False
    return ast.dump(tree) != original


def select(
    mutants: list[Mutant], *, limit: int | None, sample: int | None, seed: int
) -> list[Mutant]:
    """The mutants to run: a seeded random sample (kept in source order), or the first few."""
    if sample is not None and sample < len(mutants):
        chosen = set(random.Random(seed).sample(range(len(mutants)), sample))
        mutants = [m for i, m in enumerate(mutants) if i in chosen]
    if limit is not None:
        mutants = mutants[:limit]
    return mutants


# --------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class Stage:
    """One pytest run of a mutant: its test paths and the paths it leaves out."""

    paths: tuple[str, ...]
    ignore: tuple[str, ...] = ()

    def argv(self, extra: Sequence[str]) -> list[str]:
        """The pytest command line of this stage."""
        ignores = [f"--ignore={p}" for p in self.ignore]
        return [sys.executable, "-m", "pytest", *self.paths, *ignores, *extra]


def stages_for(
    target: Target, ignore: Sequence[str] = (), fast: Sequence[str] = FAST_TESTS
) -> list[Stage]:
    """Stage one runs the module's own test files; stage two the rest of the fast selection."""
    ignored = (*ALWAYS_IGNORED, *ignore)
    own = tuple(t for t in target.tests if t not in ignored)
    return [Stage(own, ignored), Stage(tuple(fast), (*own, *ignored))]


@dataclass
class Outcome:
    """What one run of the stages made of a mutant (or of the unmutated copy)."""

    status: str  # "killed", "timeout" or "survived"
    seconds: float
    detail: str = ""  # the first failing test, or the stage that timed out


@dataclass
class Runner:
    """Runs test stages against a private copy of ``src/`` with one module replaced.

    Parameters
    ----------
    root : Path
        The repository root: pytest runs there, so its configuration and tests are the tree's.
    src : str
        The package directory to copy, relative to ``root``.
    env : dict
        Extra environment variables for every run (the backend under test).
    pytest_args : tuple of str
        Arguments added to every pytest command line.
    """

    root: Path
    src: str = "src"
    env: dict[str, str] = field(default_factory=dict)
    pytest_args: tuple[str, ...] = PYTEST_ARGS

    @contextlib.contextmanager
    def workspace(self) -> Iterator[Path]:
        """A temporary copy of ``src/`` (without bytecode); removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="emacore-mutants-") as tmp:
            copy = Path(tmp) / "src"
            shutil.copytree(
                self.root / self.src, copy, ignore=shutil.ignore_patterns("__pycache__")
            )
            yield copy

    def run(
        self,
        copy: Path,
        path: str,
        source: bytes,
        stages: Sequence[Stage],
        timeout: Sequence[float],
    ) -> Outcome:
        """Write ``source`` as module ``path`` into the copy, run the stages, put it back."""
        module = copy / Path(path).relative_to(self.src)
        original = module.read_bytes()
        module.write_bytes(source)
        try:
            return self._run_stages(copy, stages, timeout)
        finally:
            module.write_bytes(original)

    def _run_stages(self, copy: Path, stages: Sequence[Stage], timeout: Sequence[float]) -> Outcome:
        began = time.monotonic()
        for number, (stage, limit) in enumerate(zip(stages, timeout), start=1):
            if not stage.paths:
                continue
            status, detail = self._pytest(copy, stage, limit)
            if status != "survived":
                return Outcome(status, time.monotonic() - began, f"stage {number}: {detail}")
        return Outcome("survived", time.monotonic() - began)

    def _pytest(self, copy: Path, stage: Stage, limit: float) -> tuple[str, str]:
        env = {**os.environ, **self.env, "PYTHONDONTWRITEBYTECODE": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(copy), os.environ.get("PYTHONPATH", "")) if p
        )
        # a new session, so a timeout kills the test run's own subprocesses too
        with subprocess.Popen(
            stage.argv(self.pytest_args),
            cwd=self.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                out, _ = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return "timeout", f"over {limit:.0f} s"
        if proc.returncode == 0:
            return "survived", ""
        if proc.returncode == 5:  # nothing collected: a broken selection, never a kill
            raise HarnessError(f"no tests collected by {' '.join(stage.paths)}")
        return "killed", _first_failure(out, proc.returncode)


class HarnessError(RuntimeError):
    """The harness cannot give a verdict (a failing baseline, tests not importing the copy)."""


def _first_failure(output: str, code: int) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:200]
    tail = [line for line in output.splitlines() if line.strip()]
    return f"exit {code}: {tail[-1][:200] if tail else ''}"


def check_baseline(
    runner: Runner, copy: Path, target: Target, stages: Sequence[Stage]
) -> list[float]:
    """Run the unmutated stages (they must pass) and a canary (it must fail); return timings.

    The canary is the module raising on import: if the tests still pass, they imported the
    module from somewhere other than the copy, and every verdict would be meaningless.
    """
    source = (runner.root / target.path).read_bytes()
    timings = []
    for number, stage in enumerate(stages, start=1):
        if not stage.paths:
            timings.append(0.0)
            continue
        began = time.monotonic()
        status, detail = runner._pytest(copy, stage, limit=1800)
        if status != "survived":
            raise HarnessError(f"{target.name}: stage {number} fails unmutated ({detail})")
        timings.append(time.monotonic() - began)
    canary = source + b'\nraise RuntimeError("emacore mutation canary")\n'
    outcome = runner.run(
        copy, target.path, canary, stages[:1] if stages[0].paths else stages, [1800]
    )
    if outcome.status == "survived":
        raise HarnessError(
            f"{target.name}: the tests pass with {target.path} raising on import in the copy: "
            "they do not import the mutated copy (is PYTHONPATH overridden?)"
        )
    return timings


def run_target(
    runner: Runner,
    target: Target,
    mutants: Sequence[Mutant],
    stages: Sequence[Stage],
    *,
    jobs: int = 1,
    timeout: float | None = None,
    log: Callable[[str], None] = print,
) -> list[tuple[Mutant, Outcome]]:
    """Baseline, canary, then every mutant of one module, on ``jobs`` copies of ``src/``."""
    source = (runner.root / target.path).read_bytes()
    with contextlib.ExitStack() as stack:
        copies: queue.Queue[Path] = queue.Queue()
        for _ in range(max(1, jobs)):
            copies.put(stack.enter_context(runner.workspace()))
        copy = copies.get()
        baseline = check_baseline(runner, copy, target, stages)
        copies.put(copy)
        # a generous limit: the machine is shared, and a slow kill is still a kill
        limits = [timeout if timeout is not None else 3 * t + 30 for t in baseline]
        log(
            f"{target.name}: baseline {' + '.join(f'{t:.1f}s' for t in baseline)}, "
            f"{len(mutants)} mutants"
        )

        def one(numbered: tuple[int, Mutant]) -> tuple[Mutant, Outcome]:
            number, mutant = numbered
            copy = copies.get()
            try:
                outcome = runner.run(copy, target.path, mutant.apply(source), stages, limits)
            finally:
                copies.put(copy)
            log(
                f"  [{number}/{len(mutants)}] {outcome.status:8} {outcome.seconds:5.1f}s "
                f"{mutant.path}:{mutant.line} {mutant.kind} {mutant.description}"
            )
            return mutant, outcome

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, enumerate(mutants, start=1)))


# --------------------------------------------------------------------------------------------
# Report


def _escape(text: str) -> str:
    """Text for a markdown table cell: a pipe would end the cell."""
    return text.replace("|", "\\|")


def _cell(text: str) -> str:
    """Inline code for a markdown table cell (pipes escaped, backticks avoided)."""
    return "`" + _escape(text).replace("`", "'") + "`"


def score_table(results: dict[str, list[tuple[Mutant, Outcome]]]) -> list[str]:
    """Killed, timed-out and surviving mutants per module, and the score."""
    lines = [
        "| module | mutants | killed | timeout | survived | score |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    totals = [0, 0, 0, 0]
    for name, rows in results.items():
        counts = [
            len(rows),
            sum(o.status == "killed" for _, o in rows),
            sum(o.status == "timeout" for _, o in rows),
            sum(o.status == "survived" for _, o in rows),
        ]
        totals = [a + b for a, b in zip(totals, counts)]
        lines.append(_score_row(name, counts))
    if len(results) > 1:
        lines.append(_score_row("**all**", totals))
    return lines


def _score_row(name: str, counts: list[int]) -> str:
    total, killed, timeout, survived = counts
    score = f"{100 * (killed + timeout) / total:.1f}%" if total else "n/a"
    return f"| {name} | {total} | {killed} | {timeout} | {survived} | {score} |"


def survivor_table(
    results: dict[str, list[tuple[Mutant, Outcome]]], sources: dict[str, bytes]
) -> list[str]:
    """Every surviving mutant: where, in which function, what it did, and its diff."""
    lines = ["| # | location | in | mutation | diff |", "|---:|---|---|---|---|"]
    number = 0
    for rows in results.values():
        for mutant, outcome in rows:
            if outcome.status != "survived":
                continue
            number += 1
            diff = "<br>".join(
                f"{_cell('- ' + a)}<br>{_cell('+ ' + b)}"
                for a, b in mutant.diff(sources[mutant.path])
            )
            lines.append(
                f"| {number} | {mutant.path}:{mutant.line} | `{mutant.scope}` | "
                f"{_escape(mutant.description)} | {diff} |"
            )
    return lines if number else ["No survivors."]


def timeout_list(results: dict[str, list[tuple[Mutant, Outcome]]]) -> list[str]:
    """The mutants that timed out (counted as killed): often an infinite loop, worth a look."""
    return [
        f"- {m.path}:{m.line} `{m.scope}` {m.description} ({o.detail})"
        for rows in results.values()
        for m, o in rows
        if o.status == "timeout"
    ]


def render(
    results: dict[str, list[tuple[Mutant, Outcome]]], sources: dict[str, bytes], header: str
) -> str:
    """The whole markdown report."""
    parts = ["# Mutation testing", "", header, "", *score_table(results), "", "## Survivors", ""]
    parts += survivor_table(results, sources)
    timeouts = timeout_list(results)
    if timeouts:
        parts += ["", "## Timeouts (counted as killed)", "", *timeouts]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: which modules, how many mutants, how many jobs, where the report goes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = [t.name for t in TARGETS]
    parser.add_argument(
        "--modules", default=",".join(names), help=f"comma-separated, of {', '.join(names)}"
    )
    parser.add_argument("--limit", type=int, help="run at most the first N mutants per module")
    parser.add_argument("--sample", type=int, help="run a random sample of N mutants per module")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument(
        "--timeout", type=float, help="seconds per test stage (default: 3x its baseline + 30)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("build/mutation-report.md"),  # build/ is git-ignored
        help="the markdown report (default build/mutation-report.md)",
    )
    parser.add_argument(
        "--backend", default="numpy", help="EMACORE_TEST_BACKENDS for the runs (default numpy)"
    )
    parser.add_argument(
        "--ignore", action="append", default=[], help="a test path to leave out (repeatable)"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="the checkout to mutate and test (default: this one); e.g. a `git archive` export, "
        "for a stable tree while others edit this one",
    )
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    args = parser.parse_args(argv)
    unknown = set(args.modules.split(",")) - set(names)
    if unknown:
        parser.error(f"unknown modules {sorted(unknown)}; expected some of {names}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Plant, run and report; exit 1 when the harness cannot give a verdict."""
    args = parse_args(argv)
    targets = [t for t in TARGETS if t.name in args.modules.split(",")]
    root = args.root.resolve()
    runner = Runner(root, env={"EMACORE_TEST_BACKENDS": args.backend})
    sources = {t.path: (root / t.path).read_bytes() for t in targets}
    chosen = {
        t.name: select(
            plant(t.path, sources[t.path].decode(), t.scopes),
            limit=args.limit,
            sample=args.sample,
            seed=args.seed,
        )
        for t in targets
    }
    if args.list:
        for mutants in chosen.values():
            for m in mutants:
                print(f"{m.path}:{m.line} [{m.scope}] {m.kind}: {m.description}")
        return 0
    header = _header(args, chosen)
    results: dict[str, list[tuple[Mutant, Outcome]]] = {}
    log = _logger()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for target in targets:
            results[target.name] = run_target(
                runner,
                target,
                chosen[target.name],
                stages_for(target, args.ignore),
                jobs=args.jobs,
                timeout=args.timeout,
                log=log,
            )
            # rewritten after each module, so a long run shows its results as it goes
            args.out.write_text(render(results, sources, header))
    except HarnessError as exc:
        print(f"mutate: {exc}", file=sys.stderr)
        return 1
    report = render(results, sources, header)
    args.out.write_text(report)
    print(report)
    return 0


def _header(args: argparse.Namespace, chosen: dict[str, list[Mutant]]) -> str:
    how = "every mutant"
    if args.sample is not None:
        how = f"a random sample of at most {args.sample} mutants per module (seed {args.seed})"
    if args.limit is not None:
        how += f", at most the first {args.limit} per module"
    return (
        f"{how}; {sum(map(len, chosen.values()))} run; EMACORE_TEST_BACKENDS={args.backend}; "
        f"tests: each module's own files, then {' '.join(FAST_TESTS)}"
        + (f" (ignoring {', '.join(args.ignore)})" if args.ignore else "")
        + "."
    )


def _logger() -> Callable[[str], None]:
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:7.0f}s] {message}", file=sys.stderr, flush=True)

    return log


if __name__ == "__main__":
    sys.exit(main())
