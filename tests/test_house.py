"""House rules of the code base, checked on its source (ast), not by review.

* No function in analyses/ runs over 80 lines, except a numerical kernel that says so on
  its ``def`` line (``# long: <why>``). The entry points that are longer today are listed
  in TOO_LONG_TODAY with their current length: they may only shrink (issue 12, point 5),
  and a new long function fails.
* Imports run one way: tasks -> {capture, analyses} -> storage. analyses/ imports no
  capture or tasks code; storage/ imports none of analyses, capture, tasks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80

# (file, function) -> lines on 2026-12-05 (issue 12). Split them into helpers and lower (or delete) the
# entry; a listed function may grow by SLACK lines (others edit these files too), a new one not at all.
SLACK = 5
TOO_LONG_TODAY: dict[tuple[str, str], int] = {}


def functions(path: Path):
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1, lines[node.lineno - 1]


def long_functions(root: Path = ROOT) -> dict[tuple[str, str], int]:
    out = {}
    for path in sorted((root / "analyses").rglob("*.py")):
        for name, n, def_line in functions(path):
            if n > MAX_LINES and "# long:" not in def_line:
                out[(path.relative_to(root).as_posix(), name)] = n
    return out


def test_no_new_long_function_in_analyses():
    grown = {key: n for key, n in long_functions().items() if n > TOO_LONG_TODAY.get(key, MAX_LINES - SLACK) + SLACK}
    assert not grown, f"functions over {MAX_LINES} lines (split them, or mark a kernel '# long: why'): {grown}"


def test_the_length_check_can_fail(tmp_path):
    (tmp_path / "analyses").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "analyses" / "m.py").write_text(f"def f():\n{body}\n\n\ndef g():  # long: kernel\n{body}\n")
    assert long_functions(tmp_path) == {("analyses/m.py", "f"): MAX_LINES + 1}


def imported_packages(path: Path) -> set[str]:
    """Top-level names this file imports, anywhere in it (function-level imports too); relative ones skipped."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize(("package", "forbidden"), [
    ("analyses", {"capture", "tasks", "moe_atlas"}),
    ("storage", {"analyses", "capture", "tasks", "moe_atlas"}),
])
def test_imports_run_one_way(package, forbidden):
    bad = {p.relative_to(ROOT).as_posix(): sorted(imported_packages(p) & forbidden)
           for p in sorted((ROOT / package).rglob("*.py"))}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package}/ must not import {sorted(forbidden)}: {bad}"
