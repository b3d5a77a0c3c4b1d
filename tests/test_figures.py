"""Figures: kept out of the result cache key, and every registered figure reads cleanly.

Layout check (``plotting.layout_problems``): matplotlib's renderer draws each
figure, then every rendered text (titles, axis and tick labels, legend entries,
colour-bar labels, annotations) must lie inside the canvas and overlap no other
text, and the figure must be the report's width. Each registered analysis is
run on a small seeded cube of the demo's shape (as in tests/test_contract.py)
and its figures are checked as they are saved.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import analyses
from analyses import code_files, figures
from analyses.figures import plotting
from cube_helpers import punch_holes, small_cube

ROOT = Path(analyses.__file__).parent


@pytest.fixture(scope="module")
def cube():
    # the demo's shape: four checkpoints, four MoE layers, four domains (five usage panels), E = 8, k = 2
    # capacity_factor adds capacity_dropped (for the capacity figure); the routing is unchanged
    return punch_holes(small_cube(n_checkpoints=4, n_layers=4, domains=("code", "prose", "math", "data"), seed=5,
                                  capacity_factor=1.0), seed=1)


@pytest.fixture
def checked(monkeypatch):
    """Layout problems of every figure saved while the test runs: {stem: [problem, ...]}."""
    found = {}
    real = plotting.savefig

    def checking(fig, out_dir, stem, formats=("png",)):
        plotting.fit_report_width(fig)  # what savefig does first
        found[stem] = plotting.layout_problems(fig)
        return real(fig, out_dir, stem, formats)

    monkeypatch.setattr(plotting, "savefig", checking)
    return found


def _assert_clean(found: dict, paths: list[Path]) -> None:
    assert found, "no figure went through plotting.savefig"
    bad = {stem: problems for stem, problems in found.items() if problems}
    assert not bad, "\n".join(f"{stem}: {p}" for stem, problems in bad.items() for p in problems[:5])
    for p in paths:
        if p.suffix == ".png":
            with Image.open(p) as im:
                assert im.size[0] == plotting.REPORT_WIDTH_PX, p.name


@pytest.mark.parametrize("name", sorted(analyses.REGISTRY))
def test_every_registered_figure_reads_cleanly(name, cube, checked, tmp_path):
    result = analyses.run(name, cube)
    paths = analyses.get(name).figure(result, tmp_path)
    assert set(checked) == {p.stem for p in paths}
    _assert_clean(checked, paths)


@pytest.mark.parametrize("name", ["divergence", "lens"])
def test_condition_figures_read_cleanly_with_the_demos_long_condition_names(name, cube, checked, tmp_path):
    long = {"A": "tool_context", "B": "plain"}
    cond = np.asarray(cube["condition"].values).astype(object)
    ds = cube.assign_coords(condition=(cube["condition"].dims, np.array([long.get(c, c) for c in cond], dtype=object)))
    ds.attrs.update(condition_a="tool_context", condition_b="plain")
    paths = analyses.get(name).figure(analyses.run(name, ds), tmp_path)
    _assert_clean(checked, paths)


def test_training_figure_reads_cleanly(checked, tmp_path):
    rng = np.random.default_rng(0)
    log = {
        "steps": [{"step": s, "loss": 6.0 * np.exp(-s / 80) + 2 + 0.05 * rng.standard_normal(),
                   "aux_loss": 2.0 + 0.1 * np.exp(-s / 50)} for s in range(0, 301, 5)],
        "checkpoints": [{"step": s, "eval_nll": {"code": 4.0 - s / 200, "math": 4.2 - s / 250, "prose": 4.1 - s / 300}}
                        for s in (0, 100, 200, 300)],
        "aux_loss_label": "aux loss, transformers' definition (≈ k = 2 at balance)",
    }
    paths, summary = figures.figure_module("training").figure(log, tmp_path)
    assert summary["initial_lm_loss"] == pytest.approx(log["steps"][0]["loss"])
    _assert_clean(checked, paths)
    # no per-step rows: no figure
    assert figures.figure_module("training").figure({"steps": []}, tmp_path) == ([], {})


def test_layout_check_finds_each_defect():
    """The check itself: overlapping texts, a text off the canvas and a wrong width are each reported."""
    with plotting.style():
        # no layout engine: nothing moves the panels apart, as in a figure laid out by hand
        fig, axes = plotting.new_figure(1, 2, panel_size=(3.0, 2.0), layout=None)
        assert plotting.layout_problems(fig) == []
        # panel titles that run into each other (the divergence maps' old defect)
        axes[0, 0].set_title("a left-aligned title long enough to run into its neighbour", loc="left")
        axes[0, 1].set_title("neighbour", loc="left")
        problems = plotting.layout_problems(fig)
        assert any("overlap" in p and "neighbour" in p for p in problems)
        axes[0, 0].set_title("", loc="left")
        axes[0, 1].set_title("", loc="left")
        assert plotting.layout_problems(fig) == []
        fig.text(0.99, 0.5, "off the edge")
        assert any("outside the canvas" in p for p in plotting.layout_problems(fig))
        fig.texts.clear()
        fig.set_size_inches(4.0, 2.0)
        assert any("width" in p for p in plotting.layout_problems(fig))
        plotting.plt.close(fig)


def test_panel_grid_fills_rows_evenly():
    for n in range(1, 40):
        rows, cols = plotting.panel_grid(n)
        assert rows * cols >= n > (rows - 1) * cols, n  # no empty row
        assert cols <= 3 and rows * cols - n < rows, n  # at most one empty cell per row
    assert plotting.panel_grid(5) == (2, 3) and plotting.panel_grid(4) == (2, 2)


# ------------------------------------------------------------------ cache keys


def _copy_package(tmp_path: Path) -> Path:
    dst = tmp_path / "analyses"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_version_covers_numerics_only_and_report_version_the_figures(tmp_path):
    numeric = {f.relative_to(ROOT).as_posix() for f in code_files(False)}
    drawing = {f.relative_to(ROOT).as_posix() for f in code_files(True)}
    assert not numeric & drawing
    assert "report.py" in drawing and "report.py" not in numeric
    assert {f"figures/{f.name}" for f in (ROOT / "figures").glob("*.py")} <= drawing
    assert not any(f.startswith("figures/") for f in numeric)
    assert {f"{n}.py" for n in ("usage", "registry", "bootstrap")} <= numeric

    root = _copy_package(tmp_path)
    version = analyses._code_version(False, root)
    report_version = analyses._code_version(True, root)
    # the copy hashes as the package does (read now: the tree may have changed since import)
    assert (version, report_version) == (analyses._code_version(False), analyses._code_version(True))

    # a figure edit: the report is redrawn, no result is recomputed
    f = root / "figures" / "usage.py"
    f.write_text(f.read_text() + "\n# a figure edit\n")
    assert analyses._code_version(False, root) == version
    assert analyses._code_version(True, root) != report_version
    # a style edit: the same
    f = root / "figures" / "plotting.py"
    f.write_text(f.read_text().replace("DPI = 300", "DPI = 301"))
    assert analyses._code_version(False, root) == version
    # a numeric edit: results recomputed
    f = root / "usage.py"
    f.write_text(f.read_text() + "\n# a numeric edit\n")
    assert analyses._code_version(False, root) != version


def test_an_analysis_is_recomputed_after_edits_to_its_own_code_only(tmp_path):
    """module_version: usage's version follows usage.py, what it imports and the runner, nothing else."""
    root = _copy_package(tmp_path)
    version = analyses.module_version.__wrapped__
    before = {n: version(f"analyses.{n}", root) for n in ("usage", "specialization", "divergence")}
    for other in ("interventions.py", "masks.py", "experts.py", "training.py", "confidence.py", "figures/usage.py"):
        f = root / other
        f.write_text(f.read_text() + "\n# another stage's edit\n")
    assert {n: version(f"analyses.{n}", root) for n in before} == before
    f = root / "bootstrap.py"  # imported by usage and specialization (the token pass, the intervals)
    f.write_text(f.read_text() + "\n# a shared numeric edit\n")
    after = {n: version(f"analyses.{n}", root) for n in before}
    assert all(after[n] != before[n] for n in before)
    f = root / "runner.py"  # runs every analysis
    f.write_text(f.read_text() + "\n# an execution edit\n")
    assert version("analyses.usage", root) != after["usage"]
    now = {n: version(f"analyses.{n}", root) for n in before}
    f = root / "usage.py"
    f.write_text(f.read_text() + "\n# usage's own edit\n")
    last = {n: version(f"analyses.{n}", root) for n in before}
    assert last["usage"] != now["usage"]
    assert (last["specialization"], last["divergence"]) == (now["specialization"], now["divergence"])


def test_tasks_key_results_on_version_and_the_report_on_both():
    import inspect

    import tasks

    analyse = inspect.getsource(tasks.Analyse.fingerprint)
    assert "module_version" in analyse and "REPORT_VERSION" not in analyse
    report = inspect.getsource(tasks.FullReport.fingerprint)
    assert "REPORT_VERSION" in report and "VERSION," in report


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved inside ``analyses``)."""
    pkg = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}
    return names


def test_import_direction():
    """Numerics never import a figure module; nothing in analyses imports capture or tasks."""
    # the drawing modules (plotting's file-name helper safe_stem is shared with divergence's artifacts)
    figure_modules = {f"analyses.figures.{n}" for n in [*analyses.REGISTRY, "training"]}
    assert all((ROOT / "figures" / f"{m.rsplit('.', 1)[1]}.py").exists() for m in figure_modules)
    for f in sorted(ROOT.rglob("*.py")):
        names = _imports(f)
        assert not {n for n in names if n.split(".")[0] in ("capture", "tasks")}, f
        if f.parent == ROOT and f.name not in ("report.py", "plotting.py"):
            assert not names & figure_modules, f"{f.name} imports a figure module"
    # and at run time: computing a result does not load matplotlib
    code = ("import sys; sys.path.insert(0, 'tests'); import analyses; from cube_helpers import small_cube; "
            "analyses.run('usage', small_cube(n_checkpoints=2, seed=1)); "
            "print(any(m.startswith('matplotlib') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_hook_calls_the_figure_module(cube, tmp_path):
    hook = figures.hook("change")
    assert hook.__name__ == "figure_change" and analyses.get("change").figure.__name__ == "figure_change"
    paths = hook(analyses.run("change", cube), tmp_path, ("png",))
    assert [p.name for p in paths] == ["change.png"]
    with pytest.raises(ModuleNotFoundError, match="analyses.figures.no_such_analysis"):
        figures.hook("no_such_analysis")(None, tmp_path)
    json.dumps([p.name for p in paths])
