"""The HTML report: a folder that stands on its own, headline numbers as readable tables."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import analyses
from analyses import report
from cube_helpers import small_cube
from experiments.spec import load_experiment
from storage import cube as cubes
from storage.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
NAMES = ["usage", "change", "coactivation"]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def _build(root: Path, names=NAMES, **kw):
    """A report built from real result cubes of a small seeded routing cube, with a demo training log."""
    layout = RunLayout(root)
    ds = small_cube(n_checkpoints=2, seed=3)
    for name in names:
        cubes.write_result(analyses.run(name, ds).compute(), layout.analysis(name), fingerprint=f"fp-{name}")
    layout.model_dir.mkdir(parents=True)
    steps = [{"step": s, "loss": 5.0 - s / 100, "aux_loss": 2.1} for s in range(0, 201, 10)]
    ck = [{"step": s, "eval_nll": {"code": 4.0 - s / 300, "prose": 4.2 - s / 400}} for s in (0, 200)]
    (layout.model_dir / "training_log.json").write_text(json.dumps({"steps": steps, "checkpoints": ck}))
    exp = load_experiment(REPO / "experiments" / "demo.toml")
    # the routing cube is the in-memory one (a real capture writes it through RoutingWriter)
    patch = pytest.MonkeyPatch()
    patch.setattr(report.cubes, "open_routing", lambda path, **kw: ds)
    try:
        index = report.build_report(exp, layout, names, fingerprint="fp-report", **kw)
    finally:
        patch.undo()
    return layout, index


def _in_pool(monkeypatch):
    """Sections rendered in a pool of two forked processes, even on one core."""
    monkeypatch.setattr(report, "_render_processes", lambda n_jobs: min(n_jobs, 2))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The report as FullReport builds it: sections rendered in a pool of forked processes (two,
    even on one core, so that the pool is what is tested) while a distributed client is the
    default scheduler, as it is in a luigi run (a fork once inherited that client and waited forever
    on it: the alarm turns such a hang into a failure)."""
    distributed = pytest.importorskip("distributed")

    def hung(*_):
        raise TimeoutError("the report's section pool hangs")

    patch = pytest.MonkeyPatch()
    _in_pool(patch)
    previous = signal.signal(signal.SIGALRM, hung)
    try:
        with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None):
            signal.alarm(300)
            return _build(tmp_path_factory.mktemp("run"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        patch.undo()


def test_report_folder_stands_on_its_own(built, tmp_path):
    layout, index = built
    # zipped alone and unpacked elsewhere, every link of the page resolves inside the folder
    archive = tmp_path / "report.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in layout.report_dir.rglob("*"):
            z.write(f, f.relative_to(layout.report_dir))
    unpacked = tmp_path / "elsewhere"
    with zipfile.ZipFile(archive) as z:
        z.extractall(unpacked)
    parser = _Links()
    parser.feed((unpacked / "index.html").read_text())
    local = [link for link in parser.links if not link.startswith(("#", "http:", "https:"))]
    assert any(link.endswith(".png") for link in local) and any(link.endswith(".csv") for link in local)
    for link in local:
        assert not link.startswith(("/", "..")), link
        assert (unpacked / link).exists(), f"{link} is not inside the report folder"
    # the training figure, one per analysis at least, and the summary are there
    assert (unpacked / "figures" / "training" / "training_loss.png").exists()
    assert json.loads((unpacked / "summary.json").read_text())["fingerprint"] == "fp-report"


def test_tables_where_the_readme_says_too(built):
    layout, _ = built
    for name in NAMES:
        inside = layout.report_dir / "tables" / f"{name}.csv"
        assert inside.read_bytes() == (layout.tables_dir / f"{name}.csv").read_bytes()
    assert (layout.report_dir / "summary.json").read_text() == layout.summary.read_text()


def test_headline_numbers_are_tables_not_json(built):
    layout, index = built
    page = index.read_text()
    assert "<pre" not in page, "a raw JSON dump is left in the page"
    summary = json.loads(layout.summary.read_text())
    for name in NAMES:
        section = page[page.index(f'<section id="{name}">'):]
        section = section[: section.index("</section>")]
        assert '<table class="headline">' in section
        # every finite headline number is shown (to 4 significant digits)
        numbers = []

        def walk(v):
            if isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                numbers.append(v)

        walk(summary["analyses"][name]["headline"])
        assert numbers
        for v in numbers:
            shown = str(int(v)) if isinstance(v, int) else f"{v:.4g}"
            assert f">{shown}</td>" in section, (name, v)


def test_headline_html_shapes_and_escaping():
    h = {
        "chance": 0.125,
        "earliest": {"step": 0, "partner_tv": 0.31234567},
        "final": {"step": 300, "partner_tv": float("nan")},
        "top_pairs_final": [{"layer": 1, "expert": 2, "ratio": 2.5}, {"layer": 0, "expert": 7, "ratio": 1.25}],
        "per_view": {"all": {"n": {"deep": 1}}},
        "<b>label</b>": "=cmd|' /C calc'!A0",
    }
    out = report.headline_html(h)
    assert out.count('<table class="headline">') == 3
    # earliest / final as rows of one table with the shared keys as columns
    assert "<th>earliest</th><td class=\"num\">0</td><td class=\"num\">0.3123</td>" in out
    assert "<th>final</th><td class=\"num\">300</td><td class=\"num\">—</td>" in out
    assert "<caption>top_pairs_final</caption>" in out and out.count("<tr>") >= 2 + 3 + 3
    assert "per_view › all › n › deep" in out
    assert "<b>" not in out and "&lt;b&gt;label&lt;/b&gt;" in out
    assert report.headline_html({}) == ""
    # x_first / x_last pairs side by side; an unpaired one stays a plain row
    paired = report.headline_html({"cv_first": 0.5, "cv_last": 0.25, "dead_first": 0, "dead_last": 2, "n_last": 7})
    assert "<th>first</th><th>last</th>" in paired
    assert '<th>cv</th><td class="num">0.5</td><td class="num">0.25</td>' in paired
    assert '<th>n_last</th><td class="num">7</td>' in paired
    assert np.isnan(h["final"]["partner_tv"])  # the input is left as it was


def test_parallel_and_serial_reports_are_the_same(built, tmp_path):
    layout, index = built
    serial, serial_index = _build(tmp_path / "serial", parallel=False)

    def files(root: Path) -> set[str]:
        return {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()}

    assert files(layout.report_dir) == files(serial.report_dir)
    assert files(layout.tables_dir) == files(serial.tables_dir)
    for rel in files(layout.report_dir):
        if rel.endswith((".csv", ".png", ".txt")):  # PDFs and SVGs carry their creation time
            assert (layout.report_dir / rel).read_bytes() == (serial.report_dir / rel).read_bytes(), rel
    a, b = (json.loads(x.summary.read_text()) for x in (layout, serial))
    assert a.pop("generated") and b.pop("generated")
    assert a == b and list(a["analyses"]) == NAMES  # the experiment's order, wherever a section rendered

    def page(p: Path) -> str:
        return re.sub(r"generated [^<·]*", "", p.read_text())

    assert page(index) == page(serial_index)


def test_an_analysis_a_script_registered_renders_in_the_pool(tmp_path, monkeypatch):
    """Registered at run time, outside the analyses package: the forked processes know it too."""
    base = analyses.get("usage")

    def script_usage(routing, **kw):
        return base.func(routing, **kw).assign_attrs(analysis="script_usage")

    analyses.register(dataclasses.replace(base, name="script_usage", func=script_usage, title="Script usage"))
    _in_pool(monkeypatch)
    try:
        layout, index = _build(tmp_path, names=["script_usage"])
    finally:
        del analyses.REGISTRY["script_usage"]
    assert re.search(r'<section id="script_usage">\s*<h2>Script usage</h2>', index.read_text())
    assert list((layout.report_dir / "figures" / "script_usage").glob("*.png"))
    assert json.loads(layout.summary.read_text())["analyses"]["script_usage"]["headline"]
