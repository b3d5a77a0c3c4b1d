"""The run explorer: its data against brute-force counts, and the page in headless Chromium."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from analyses.explorer_data import choose_samples, explorer_data, group_intervals, routing_counts, token_columns
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


def test_group_intervals_match_a_replicate_by_replicate_count(cube):
    """Intervals of a condition group: each replicate recounted token by token with the drawn multiplicities."""
    from analyses.bootstrap import bootstrap_weights

    cols = token_columns(cube)
    cond = sorted(set(cols["condition"]) - {""})[0]
    gmask = cols["condition"] == cond
    lo, hi = group_intervals(cube, cols, [("c", gmask)], n_boot=30, ci=0.9, seed=5)
    samples = np.unique(cols["sample"][gmask])
    w = bootstrap_weights(len(samples), 30, 5)
    ids = cube.expert_ids.values
    mult = {s: i for i, s in enumerate(samples)}
    for c, li, vi in [(0, 0, 0), (2, 1, 1)]:
        view = {0: np.ones_like(gmask), 1: cols["canonical"]}[vi]
        reps = np.zeros((30, 8))
        for b in range(30):
            num, den = np.zeros(8), 0.0
            for t in np.flatnonzero(gmask & view):
                for e in ids[c, li, t]:
                    if e >= 0:
                        num[e] += w[b, mult[cols["sample"][t]]]
                        den += w[b, mult[cols["sample"][t]]]
            reps[b] = num / den
        np.testing.assert_allclose(lo[c, li, vi, 0], np.quantile(reps, 0.05, axis=0))
        np.testing.assert_allclose(hi[c, li, vi, 0], np.quantile(reps, 0.95, axis=0))
    data = explorer_data(cube)  # no usage cube: every group gets an interval, and it brackets the value
    v, l, h = (np.asarray(data["map"][k], dtype=float) for k in ("value", "lo", "hi"))
    assert np.isfinite(l).all() and (l <= v + 1e-9).all() and (v <= h + 1e-9).all()


def test_sampling_keeps_whole_samples_within_budget(cube):
    cols = token_columns(cube)
    chosen, sampled = choose_samples(cols, max_tokens=45)
    assert sampled and chosen
    n = sum(int((cols["sample"] == s).sum()) for s in chosen)
    assert n <= 45
    assert choose_samples(cols, max_tokens=10**6) == (sorted(set(int(s) for s in cols["sample"])), False)


def test_sampling_keeps_a_pair_when_pairs_come_last(cube):
    """Unpaired samples first (as in the demo, where the pairs follow the plain eval set): a pair is still embedded."""
    cols = token_columns(cube)
    cols["pair"] = np.where(cols["sample"] < 4, "", cols["pair"]).astype(object)
    cols["condition"] = np.where(cols["sample"] < 4, "", cols["condition"]).astype(object)
    cols["domain"] = np.full(len(cols["sample"]), "code", dtype=object)  # one domain: domains alone would not reach it
    chosen, sampled = choose_samples(cols, max_tokens=60)
    pairs = {cols["pair"][cols["sample"] == s][0] for s in chosen} - {""}
    assert sampled and pairs
    for p in pairs:
        assert {int(s) for s in np.unique(cols["sample"][cols["pair"] == p])} <= set(chosen)


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
        check_pair_layout_and_token_tap(p)
        png = Image.open(io.BytesIO(p.screenshot())).convert("L")
        assert np.asarray(png).std() > 5, "blank screenshot"
        p.call("Runtime.evaluate", expression="1")  # drain pending console events
        assert p.errors == []
    finally:
        p.close()


def check_pair_layout_and_token_tap(p):
    """Aligned tokens of the pair share a place; tapping a token marks its partner and selects its top-1 expert."""
    get = "Bokeh.documents[0].get_model_by_name"
    a = p.eval(f"(function (s) {{ var o = {{}}; for (var k in s.data) o[k] = Array.from(s.data[k]); return o; }})"
               f"({get}('tokens_A'))")
    b = p.eval(f"(function (s) {{ var o = {{}}; for (var k in s.data) o[k] = Array.from(s.data[k]); return o; }})"
               f"({get}('tokens_B'))")
    pairs = [(t, int(s.rsplit(" ", 1)[1])) for t, s in enumerate(a["aligned"]) if s.startswith("sample ")]
    assert pairs, "the first sample shown has no aligned tokens"
    for t, j in pairs:  # the mock cube aligns by position: monotonic, so every pair shares its place
        assert (a["x"][t], a["y"][t]) == (b["x"][j], b["y"][j]), (t, j)
    assert len(set(zip(a["x"], a["y"]))) == len(a["x"]), "two tokens of one panel overlap"
    t, j = pairs[len(pairs) // 2]
    p.eval(f"{get}('tokens_A').selected.indices = [{t}]")
    assert p.eval(f"Array.from({get}('tokens_B').selected.indices)") == [j]
    assert p.eval(f"{get}('expert_select').value") == str(a["top1"][t])
    assert p.eval(f"{get}('top_tokens').text").startswith(f"<b>Top tokens of expert {a['top1'][t]}<")
    assert p.eval(f"Array.from({get}('tokens_A').selected.indices)") == [t], "the redraw dropped the marked token"


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


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (apt-get install -y chromium; .ci/run installs it)")
def test_served_page_fetches_samples_in_headless_chromium(tmp_path):
    """`moe-atlas serve`'s page embeds no sample: choosing one fetches it, and the tokens are the cube's."""
    import threading

    from moe_atlas.cmd_serve import make_server
    from run_builder import build_run

    run = build_run(tmp_path / "run")
    server = make_server(run.layout.root, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    get = "Bokeh.documents[0].get_model_by_name"
    p = Page(chromium())
    try:
        p.open(f"http://127.0.0.1:{server.server_address[1]}/", f"window.Bokeh !== undefined && "
               f"Bokeh.documents.length > 0 && {get}('tokens_A').data.text.length > 0")
        assert p.eval("Object.keys(MOE.data().samples).length") > 0  # fetched, not embedded
        last = int(run.cube["sample"].values.max())
        p.eval(f"{get}('sample_select').value = '{last}'")
        for _ in range(200):
            if p.eval(f"{get}('tokens_fig_A').title.text").startswith(f"sample {last} "):
                break
            time.sleep(0.05)
        text = p.eval(f"Array.from({get}('tokens_A').data.text)")
        want = [str(t).replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"
                for t in run.cube["token_text"].values[run.cube["sample"].values == last]]
        assert text == want and want
        p.call("Runtime.evaluate", expression="1")  # drain pending console events
        assert p.errors == []
    finally:
        p.close()
        server.shutdown()
        server.server_close()
