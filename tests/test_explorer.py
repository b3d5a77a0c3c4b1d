"""The run explorer: its data against brute-force counts, and the page in headless Chromium."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from analyses.explorer_data import choose_samples, explorer_data, routing_counts, token_columns
from analyses.figures import explorer, tokens
from storage.schema import mock_cube

from browser_helpers import Page, chromium


@pytest.fixture(scope="module")
def cube():
    return mock_cube(n_checkpoints=3, n_samples=6, seq_len=20, n_layers=2, num_experts=8, top_k=2, seed=3)


def test_counts_match_brute_force(cube):
    cols = token_columns(cube)
    got = routing_counts(cube, cols)
    ids = cube.expert_ids.values
    C, L, T, K = ids.shape
    trans = np.zeros((C, L, 8, 8))
    slots = np.zeros((C, L, 8))
    for c in range(C):
        for li in range(L):
            for t in range(T):
                for k in range(K):
                    if ids[c, li, t, k] >= 0:
                        slots[c, li, ids[c, li, t, k]] += 1
                if t + 1 < T and cols["sample"][t] == cols["sample"][t + 1] and min(ids[c, li, t, 0], ids[c, li, t + 1, 0]) >= 0:
                    trans[c, li, ids[c, li, t, 0], ids[c, li, t + 1, 0]] += 1
    np.testing.assert_array_equal(got["transition_count"], trans)
    np.testing.assert_array_equal(got["slots"][:, :, 0, 0], slots)  # view all, all domains


def test_sampling_keeps_whole_samples_within_budget(cube):
    cols = token_columns(cube)
    chosen, sampled = choose_samples(cols, max_tokens=45)
    assert sampled and chosen
    n = sum(int((cols["sample"] == s).sum()) for s in chosen)
    assert n <= 45
    assert choose_samples(cols, max_tokens=10**6) == (sorted(set(int(s) for s in cols["sample"])), False)


def test_page_is_standalone_and_static_figures(cube, tmp_path):
    data = explorer_data(cube)
    page = explorer.write_page(data, tmp_path / "explorer.html")
    text = page.read_text()
    assert "moe-explorer-data" in text and "<script src=" not in text and "<link" not in text  # inline only
    json.dumps(data, allow_nan=False)
    files = tokens.figure(data, tmp_path / "fig")
    assert [f.name for f in files] == ["tokens_heatmap.png", "tokens_timeline.png"]


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (apt-get install -y chromium; .ci/run installs it)")
def test_page_in_headless_chromium(cube, tmp_path):
    from PIL import Image

    page_file = explorer.write_page(explorer_data(cube), tmp_path / "explorer.html")
    p = Page(chromium())
    try:
        p.open(page_file.as_uri(), "window.Bokeh !== undefined && Bokeh.documents.length > 0 && "
               "Bokeh.documents[0].get_model_by_name('map_source').data.value.length > 0")
        before = p.eval("Array.from(Bokeh.documents[0].get_model_by_name('map_source').data.value)")
        tok = p.eval("Bokeh.documents[0].get_model_by_name('tokens_A').data.text.length")
        p.eval("Bokeh.documents[0].get_model_by_name('ckpt_slider').value = 0")
        after = p.eval("Array.from(Bokeh.documents[0].get_model_by_name('map_source').data.value)")
        assert len(before) == len(after) == 2 * 8
        assert before != after, "moving the checkpoint slider did not change the routing map"
        assert tok > 0
        png = Image.open(io.BytesIO(p.screenshot())).convert("L")
        assert np.asarray(png).std() > 5, "blank screenshot"
        p.call("Runtime.evaluate", expression="1")  # drain pending console events
        assert p.errors == []
    finally:
        p.close()


def test_serve_sends_page_and_samples(tmp_path):
    import threading
    import urllib.request

    from analyses.explorer_data import sample_record
    from moe_atlas.cmd_serve import make_server
    from run_builder import build_run
    from storage import cube as cubes

    run = build_run(tmp_path / "run")
    server = make_server(run.layout.root, 0)
    assert server.server_address[0] == "127.0.0.1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        page = urllib.request.urlopen(base + "/", timeout=30).read().decode()
        assert "sample/{sample}.json" in page
        got = json.loads(urllib.request.urlopen(base + "/sample/2.json", timeout=30).read())
        want = json.loads(json.dumps(sample_record(cubes.open_routing(run.routing), 2)))
        assert got == want and got["ids"] == run.cube.expert_ids.values[:, :, run.cube["sample"].values == 2].tolist()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/sample/999.json", timeout=30)
    finally:
        server.shutdown()
        server.server_close()
