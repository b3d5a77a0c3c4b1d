"""The run explorer: one standalone HTML page (Bokeh, inline resources, CustomJS; no server).

Views, linked through shared widgets (checkpoint slider, layer, group, token view,
sample, expert):

* **Routing map** — layer × expert usage heatmap; hover shows value, CI and chance;
  clicking a cell selects its layer and expert.
* **Across checkpoints** — the selected expert's usage per group (all domains,
  each domain, each condition) along the checkpoints, and its top tokens.
* **Tokens** — one sample's tokens coloured by their top-1 expert at the chosen
  layer; hover shows top-k ids and weights per layer, lens log-prob and NLL; the
  other condition of its pair sits beside it, laid out together so that aligned
  tokens share a place (``MOE.layoutPair``); clicking a token marks the aligned
  one and selects its top-1 expert.
* **Timeline** — per-expert activation (received weight) along the sample's
  tokens, and the transition matrix P(top1_t+1 = j | top1_t = i) of the layer.

The numbers come from :func:`analyses.explorer_data.explorer_data`, embedded as
one JSON ``<script>`` (``moe-explorer-data``) that the page's JavaScript reads.
With ``fetch_url`` the page holds no samples and fetches each one
(``moe-atlas serve``). The page works from ``file://`` offline: BokehJS is
inlined, nothing is loaded from elsewhere.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bokeh.core.properties import value
from bokeh.document import Document
from bokeh.embed import file_html
from bokeh.layouts import column, row
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    CustomJS,
    Div,
    FixedTicker,
    HoverTool,
    LinearColorMapper,
    Select,
    Slider,
    Span,
    TapTool,
)
from bokeh.palettes import Blues256, Category10, Category20, Viridis256, turbo
from bokeh.plotting import figure
from bokeh.resources import INLINE

PAGE = "explorer.html"
WRAP = 64  # characters per line of the token views

_TEMPLATE = """
{% block postamble %}
<style>body { font-family: system-ui, sans-serif; margin: 1em; } .moe-note { color: #444; font-size: 90%; }</style>
<script type="application/json" id="moe-explorer-data">{{ explorer_json | safe }}</script>
<script>{{ explorer_js | safe }}</script>
{% endblock %}
"""

JS = r"""
window.MOE = (function () {
  "use strict";
  var D = null;
  function data() {
    if (D === null) D = JSON.parse(document.getElementById("moe-explorer-data").textContent);
    return D;
  }
  var ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
  function esc(s) { return String(s).replace(/[&<>"']/g, function (c) { return ESC[c]; }); }
  function shown(t) { var s = t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); return s.length ? s : "\u2205"; }
  function num(v) { return (v === null || v === undefined) ? NaN : v; }
  function fmt(v, d) { return (v === null || v === undefined || isNaN(v)) ? "n/a" : Number(v).toFixed(d); }
  var busy = false;

  function getSample(s, cb) {
    var d = data(), k = String(s);
    if (d.samples[k]) { cb(d.samples[k]); return; }
    if (!d.fetch_url) { cb(null); return; }
    fetch(d.fetch_url.replace("{sample}", k)).then(function (r) {
      if (!r.ok) throw new Error("sample " + k + ": HTTP " + r.status);
      return r.json();
    }).then(function (rec) { d.samples[k] = rec; cb(rec); }).catch(function (e) { console.warn(String(e)); cb(null); });
  }
  function indexOf(s) {
    var idx = data().samples_index;
    for (var i = 0; i < idx.length; i++) if (String(idx[i].sample) === String(s)) return idx[i];
    return null;
  }

  // Where each token sits (x centre, line, width) in the two panels, laid out together: a token and its aligned
  // partner get the same place (the panel that is behind skips ahead), unaligned tokens flow in their own panel.
  function layoutPair(recA, recB) {
    var d = data(), W = d.wrap;
    var P = [{rec: recA, i: 0, x: 0, line: 0, out: []}, {rec: recB, i: 0, x: 0, line: 0, out: []}];
    function width(p, t) { return Math.min(Math.max(shown(p.rec.text[t]).length, 1), W); }
    function put(p, w) {
      if (p.x + w > W) { p.x = 0; p.line += 1; }
      p.out.push([p.x + w / 2, p.line, w]);
      p.x += w;
      if (p.rec.text[p.out.length - 1].indexOf("\n") >= 0) { p.x = 0; p.line += 1; }
      p.i += 1;
    }
    function partner(p, q) {  // index in q of the token aligned to p's next token, or -1
      var a = p.rec.aligned[p.i];
      return (a && q.rec && String(a[0]) === String(q.rec.sample)) ? a[1] : -1;
    }
    var A = P[0], B = P[1];
    if (!recB) B.rec = null;
    while (A.i < (recA ? recA.text.length : 0) || (B.rec && B.i < B.rec.text.length)) {
      var aDone = !recA || A.i >= recA.text.length, bDone = !B.rec || B.i >= B.rec.text.length;
      var ja = aDone ? -1 : partner(A, B), jb = bDone ? -1 : partner(B, A);
      if (!aDone && !bDone && ja === B.i && jb === A.i) {  // an aligned pair: same place in both panels
        var later = (A.line > B.line || (A.line === B.line && A.x >= B.x)) ? A : B;
        A.line = B.line = later.line; A.x = B.x = later.x;
        var w = Math.max(width(A, A.i), width(B, B.i));
        var lineBefore = A.line;
        put(A, w); put(B, w);
        if (A.line !== lineBefore || B.line !== lineBefore) {  // a newline in either: both start the next line
          A.line = B.line = Math.max(A.line, B.line); A.x = B.x = 0;
        }
      } else if (!aDone && (ja < B.i || bDone)) {
        put(A, width(A, A.i));
      } else if (!bDone) {
        put(B, width(B, B.i));
      } else {
        put(A, width(A, A.i));
      }
    }
    return [A.out, B.out, Math.max(A.line, B.line)];
  }

  var shownSample = {};
  function tokens(rec, place, lines, c, li, src, fig) {
    var d = data();
    var cols = {x: [], y: [], w: [], text: [], color: [], top1: [], topk: [], lens: [], nll: [], pos: [], aligned: []};
    if (rec === null) {
      src.data = cols; fig.title.text = "(no sample)"; shownSample[src.id] = null; return;
    }
    for (var t = 0; t < rec.text.length; t++) {
      var id = rec.ids[c][li][t][0];
      cols.x.push(place[t][0]); cols.y.push(-place[t][1]); cols.w.push(place[t][2] - 0.1);
      cols.text.push(shown(rec.text[t]));
      cols.color.push(id >= 0 && id < d.palette.length ? d.palette[id] : "#dddddd");
      cols.top1.push(id);
      var parts = [];
      for (var l = 0; l < d.layers.length; l++) {
        var ids = rec.ids[c][l][t], ws = rec.weights ? rec.weights[c][l][t] : null, slot = [];
        for (var k = 0; k < ids.length; k++) slot.push(ids[k] + (ws ? " (" + fmt(ws[k], 2) + ")" : ""));
        parts.push("L" + d.layers[l] + ": " + slot.join(", "));
      }
      cols.topk.push(parts.join(" | "));
      var lp = [];
      if (rec.lens) for (var l2 = 0; l2 < d.layers.length; l2++) lp.push("L" + d.layers[l2] + ": " + fmt(rec.lens[c][l2][t], 2));
      cols.lens.push(rec.lens ? lp.join(" | ") : "not captured");
      cols.nll.push(rec.nll ? fmt(rec.nll[c][t], 3) : "not captured");
      cols.pos.push(rec.position[t]);
      var a = rec.aligned[t];
      cols.aligned.push(a ? "sample " + a[0] + ", token " + a[1] : "\u2014");
    }
    src.data = cols;
    if (shownSample[src.id] !== rec.sample) src.selected.indices = [];  // a new sample: no marked token
    shownSample[src.id] = rec.sample;
    fig.y_range.start = -lines - 0.6; fig.y_range.end = 0.6;
    fig.height = Math.max(140, 20 * (lines + 1) + 60);
    fig.title.text = "sample " + rec.sample + " \u00b7 " + rec.domain + " \u00b7 " + (rec.condition || "unpaired") +
      " \u2014 colour: top-1 expert at layer " + d.layers[li] + ", " + d.checkpoints[c];
  }

  function drawPair(m, recA, recB, c, li) {
    var lay = layoutPair(recA, recB);
    tokens(recA, lay[0], lay[2], c, li, m.tokA_src, m.tokA_fig);
    tokens(recB, lay[1], lay[2], c, li, m.tokB_src, m.tokB_fig);
  }

  function timeline(rec, c, li, m) {
    var d = data(), E = d.num_experts;
    var cols = {t: [], expert: [], value: [], text: []};
    if (rec !== null) {
      for (var t = 0; t < rec.text.length; t++) {
        var ids = rec.ids[c][li][t], ws = rec.weights ? rec.weights[c][li][t] : null;
        for (var e = 0; e < E; e++) {
          var v = 0;
          for (var k = 0; k < ids.length; k++) if (ids[k] === e) v = ws ? num(ws[k]) : 1;
          cols.t.push(t); cols.expert.push(e); cols.value.push(v); cols.text.push(shown(rec.text[t]));
        }
      }
      m.tl_fig.x_range.start = -0.5; m.tl_fig.x_range.end = rec.text.length - 0.5;
      m.tl_fig.title.text = "Per-expert activation along sample " + rec.sample + " (weight received; layer " +
        d.layers[li] + ", " + d.checkpoints[c] + ")";
    }
    m.tl_src.data = cols;
    var tr = {i: [], j: [], value: []};
    for (var i = 0; i < E; i++) for (var j = 0; j < E; j++) {
      tr.i.push(i); tr.j.push(j); tr.value.push(num(d.transition[c][li][i][j]));
    }
    m.tr_src.data = tr;
    m.tr_fig.title.text = "P(top-1 at t+1 = j | top-1 at t = i), layer " + d.layers[li] + ", " + d.checkpoints[c];
  }

  function refresh(m) {
    if (busy) return;
    busy = true;
    try {
      var d = data(), E = d.num_experts, L = d.layers.length;
      var c = Math.round(m.ckpt.value), li = Math.max(0, d.layers.indexOf(parseInt(m.layer.value)));
      var vi = Math.max(0, d.views.indexOf(m.view.value)), gi = Math.max(0, d.groups.indexOf(m.group.value));
      var e = parseInt(m.expert.value);
      m.ckpt_div.text = "<b>" + esc(d.checkpoints[c]) + "</b> (step " + d.steps[c] + ")";
      // routing map
      var mp = {expert: [], layer: [], value: [], ci: [], chance: []};
      for (var l = 0; l < L; l++) for (var x = 0; x < E; x++) {
        var v = d.map.value[c][l][vi][gi][x], lo = d.map.lo[c][l][vi][gi][x], hi = d.map.hi[c][l][vi][gi][x];
        mp.expert.push(x); mp.layer.push(l); mp.value.push(num(v));
        mp.ci.push(lo === null || hi === null ? "none" : "[" + fmt(lo, 3) + ", " + fmt(hi, 3) + "]");
        mp.chance.push(d.chance);
      }
      m.map_src.data = mp;
      m.map_src.selected.indices = [li * E + e];
      m.map_fig.title.text = "Usage share \u00b7 " + d.groups[gi] + " \u00b7 tokens: " + d.views[vi] + " \u00b7 " +
        d.checkpoints[c];
      // across checkpoints
      for (var g = 0; g < m.line_srcs.length; g++) {
        var ys = [];
        for (var cc = 0; cc < d.checkpoints.length; cc++) ys.push(num(d.map.value[cc][li][vi][g][e]));
        m.line_srcs[g].data = {x: d.steps.slice(), y: ys, group: d.steps.map(function () { return d.groups[g]; })};
      }
      m.now.location = d.steps[c];
      m.ac_fig.title.text = "Expert " + e + " at layer " + d.layers[li] + ": usage by group across checkpoints (view " +
        d.views[vi] + ")";
      var top = d.top_tokens[c][li][e] || [];
      m.top_div.text = "<b>Top tokens of expert " + e + "</b> (layer " + d.layers[li] + ", " + esc(d.checkpoints[c]) +
        "; routing slots):<br>" + (top.length ? top.map(function (p) {
          return "<code>" + esc(shown(p[0])) + "</code>&nbsp;" + p[1];
        }).join(" \u00b7 ") : "none");
      // tokens, timeline, transitions
      var s = m.sample.value, entry = indexOf(s);
      getSample(s, function (rec) {
        timeline(rec, c, li, m);
        if (rec !== null && entry && entry.partner >= 0) {
          getSample(entry.partner, function (recB) { drawPair(m, rec, recB, c, li); });
        } else {
          drawPair(m, rec, null, c, li);
          m.tokB_fig.title.text = "(sample " + s + " has no pair partner)";
        }
      });
    } finally {
      busy = false;
    }
  }

  function tapMap(m) {
    if (busy) return;
    var idx = m.map_src.selected.indices;
    if (!idx.length) return;
    var d = data(), E = d.num_experts, i = idx[idx.length - 1];
    busy = true;
    try {
      m.layer.value = String(d.layers[Math.floor(i / E)]);
      m.expert.value = String(i % E);
    } finally { busy = false; }
    refresh(m);
  }
  function tapTimeline(m) {
    var idx = m.tl_src.selected.indices;
    if (!idx.length) return;
    m.expert.value = String(m.tl_src.data.expert[idx[idx.length - 1]]);
  }
  var tapping = false, echo = null;
  function tapToken(m, src, other) {  // mark the aligned token of the other condition, select the top-1 expert
    var idx = src.selected.indices, t = idx.length ? idx[idx.length - 1] : -1;
    if (echo !== null && echo[0] === src.id && echo[1] === t) { echo = null; return; }  // our own mark, not a tap
    if (tapping || busy || t < 0) return;
    tapping = true;
    try {
      var hit = /token (\d+)/.exec(src.data.aligned[t]);
      echo = hit ? [other.id, parseInt(hit[1])] : null;
      other.selected.indices = hit ? [parseInt(hit[1])] : [];
      var e = src.data.top1[t];
      if (e >= 0 && String(e) !== m.expert.value) m.expert.value = String(e);
    } finally { tapping = false; }
  }
  return {data: data, refresh: refresh, tapMap: tapMap, tapTimeline: tapTimeline, tapToken: tapToken, esc: esc,
          layoutPair: layoutPair};
})();
"""


def palette(n: int) -> list[str]:
    """One colour per expert (categorical up to 20, turbo beyond)."""
    if n <= 10:
        return list(Category10[10][:max(n, 3)])[:n]
    if n <= 20:
        return list(Category20[20][:n])
    return list(turbo(n))


def _json_for_script(data: dict) -> str:
    """JSON safe inside a <script> element: no '<' (so no '</script>' or '<!--') outside escapes."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _heatmap(title: str, x_range, y_range, width: int, height: int, tools: str = "tap") -> figure:
    fig = figure(title=title, x_range=x_range, y_range=y_range, width=width, height=height, tools=tools,
                 toolbar_location=None)
    fig.grid.visible = False
    return fig


def _first_sample(index: list[dict]) -> dict | None:
    """The sample shown first: the first one with a pair partner, else the first one."""
    return next((e for e in index if e["partner"] >= 0 and e["condition"]), index[0] if index else None)


def _widgets(data: dict) -> dict:
    """The shared widgets (checkpoint slider, layer, group, token view, sample, expert) by role."""
    C, layers, index = len(data["checkpoints"]), list(data["layers"]), data["samples_index"]
    first = _first_sample(index)
    return dict(
        ckpt=Slider(title="checkpoint", start=0, end=max(C - 1, 1), value=C - 1, step=1, name="ckpt_slider",
                    disabled=C < 2, width=260),
        ckpt_div=Div(text="", name="ckpt_label", width=240),
        layer=Select(title="layer", value=str(layers[len(layers) // 2]), options=[str(x) for x in layers],
                     name="layer_select", width=110),
        group=Select(title="domain / condition", value=data["groups"][0], options=list(data["groups"]),
                     name="group_select", width=200),
        view=Select(title="tokens", value=data["views"][0], options=list(data["views"]), name="view_select",
                    width=140),
        sample=Select(title="sample", value=str(first["sample"]) if first else "", name="sample_select", width=320,
                      options=[(str(e["sample"]), f"{e['sample']} · {e['domain']} · {e['condition'] or 'unpaired'}"
                                f" · {e['tokens']} tok") for e in index]),
        expert=Select(title="expert", value="0", options=[str(e) for e in range(int(data["num_experts"]))],
                      name="expert_select", width=100),
    )


def _map_view(data: dict) -> dict:
    """Routing map: layer × expert usage heatmap (hover: value, CI, chance; tap: select layer and expert)."""
    E, layers = int(data["num_experts"]), list(data["layers"])
    vmax = max([v for v in np.ravel(np.asarray(data["map"]["value"], dtype=float)) if np.isfinite(v)] or [1.0])
    src = ColumnDataSource({"expert": [], "layer": [], "value": [], "ci": [], "chance": []}, name="map_source")
    fig = _heatmap("Expert usage", (-0.5, E - 0.5), (len(layers) - 0.5, -0.5), 520, 80 + 42 * len(layers))
    cm = LinearColorMapper(palette=Viridis256, low=0, high=vmax, nan_color="#eeeeee")
    fig.rect("expert", "layer", 0.95, 0.95, source=src, fill_color={"field": "value", "transform": cm},
             line_color=None, selection_line_color="red", selection_line_width=3, nonselection_fill_alpha=1.0)
    fig.add_layout(ColorBar(color_mapper=cm, width=10, title="share of routing slots"), "right")
    fig.yaxis.ticker = FixedTicker(ticks=list(range(len(layers))))
    fig.yaxis.major_label_overrides = {i: f"L{x}" for i, x in enumerate(layers)}
    fig.xaxis.ticker = FixedTicker(ticks=list(range(E)))
    fig.xaxis.axis_label, fig.yaxis.axis_label = "expert", "MoE layer"
    fig.add_tools(HoverTool(tooltips=[("layer", "@layer"), ("expert", "@expert"), ("usage", "@value{0.000}"),
                                      ("95% CI", "@ci"), ("chance", "@chance{0.000}")]))
    return dict(map_src=src, map_fig=fig)


def _across_view(data: dict) -> dict:
    """The selected expert's usage per group along the checkpoints, and a box for its top tokens."""
    groups = list(data["groups"])
    fig = figure(title="Across checkpoints", width=600, height=260, tools="", toolbar_location=None,
                 x_axis_label="training step", y_axis_label="usage share")
    colours = palette(len(groups)) if len(groups) > 2 else ["#000000", "#0072B2"][: len(groups)]
    line_srcs = []
    for g, colour in zip(groups, colours):
        src = ColumnDataSource({"x": [], "y": [], "group": []})
        fig.line("x", "y", source=src, color=colour, legend_label=g, line_width=2,
                 line_dash="solid" if not g.startswith("condition") else "dashed")
        fig.scatter("x", "y", source=src, color=colour, size=5)
        line_srcs.append(src)
    fig.add_layout(Span(location=data["chance"], dimension="width", line_dash="dotted", line_color="#555555"))
    now = Span(location=data["steps"][-1], dimension="height", line_color="#bbbbbb")
    fig.add_layout(now)
    fig.legend.label_text_font_size = "8pt"
    fig.legend.click_policy = "hide"
    fig.add_layout(fig.legend[0], "right")  # beside the plot: inside it hides the lines
    fig.add_tools(HoverTool(tooltips=[("group", "@group"), ("step", "@x"), ("usage", "@y{0.000}")]))
    return dict(ac_fig=fig, line_srcs=line_srcs, now=now, top_div=Div(text="", width=600, name="top_tokens"))


def _token_views(data: dict) -> dict:
    """Two token panels (a sample and its pair partner, laid out together so aligned tokens share a place)."""
    out = {}
    for side in ("A", "B"):
        src = ColumnDataSource({k: [] for k in ("x", "y", "w", "text", "color", "top1", "topk", "lens", "nll", "pos",
                                                 "aligned")}, name=f"tokens_{side}")
        fig = figure(title="", width=560, height=200, x_range=(0, WRAP), y_range=(-5, 0.6), tools="tap",
                     toolbar_location=None, name=f"tokens_fig_{side}")
        fig.axis.visible = False
        fig.grid.visible = False
        fig.rect("x", "y", "w", 0.85, source=src, fill_color="color", fill_alpha=0.55, line_color=None,
                 selection_line_color="black", selection_line_width=2, nonselection_fill_alpha=0.55)
        fig.text("x", "y", text="text", source=src, text_align="center", text_baseline="middle",
                 text_font=value("monospace"), text_font_size="11px")
        fig.add_tools(HoverTool(tooltips=[("token", "@text"), ("position", "@pos"), ("top-1", "@top1"),
                                          ("top-k (weight) by layer", "@topk"), ("lens log-prob", "@lens"),
                                          ("NLL (nats)", "@nll"), ("aligned", "@aligned")]))
        out[f"tok{side}_src"], out[f"tok{side}_fig"] = src, fig
    out["legend"] = Div(text="Top-1 expert colours: " + " ".join(
        f'<span style="background:{c};opacity:.6;padding:0 .4em">{e}</span>' for e, c in enumerate(data["palette"])))
    return out


def _timeline_views(data: dict) -> dict:
    """Per-expert activation along the sample (seed 002) and the layer's transition matrix (seed 004)."""
    E = int(data["num_experts"])
    tl_src = ColumnDataSource({"t": [], "expert": [], "value": [], "text": []}, name="timeline_source")
    tl_fig = _heatmap("Per-expert activation", (-0.5, 10), (E - 0.5, -0.5), 700, 80 + 22 * E)
    tl_cm = LinearColorMapper(palette=list(reversed(Blues256)), low=0, high=1)
    tl_fig.rect("t", "expert", 1, 0.9, source=tl_src, fill_color={"field": "value", "transform": tl_cm},
                line_color=None, nonselection_fill_alpha=1.0)
    tl_fig.yaxis.ticker = FixedTicker(ticks=list(range(E)))
    tl_fig.xaxis.axis_label, tl_fig.yaxis.axis_label = "token index in sample", "expert"
    tl_fig.add_tools(HoverTool(tooltips=[("token", "@t: @text"), ("expert", "@expert"), ("weight", "@value{0.000}")]))
    tr_src = ColumnDataSource({"i": [], "j": [], "value": []}, name="transition_source")
    tr_fig = _heatmap("Transitions", (-0.5, E - 0.5), (E - 0.5, -0.5), 380, 340, tools="")
    tr_cm = LinearColorMapper(palette=Viridis256, low=0, high=1)
    tr_fig.rect("j", "i", 0.95, 0.95, source=tr_src, fill_color={"field": "value", "transform": tr_cm},
                line_color=None)
    tr_fig.add_layout(ColorBar(color_mapper=tr_cm, width=10), "right")
    tr_fig.xaxis.axis_label, tr_fig.yaxis.axis_label = "expert at t+1 (j)", "top-1 expert at t (i)"
    tr_fig.xaxis.ticker = FixedTicker(ticks=list(range(E)))
    tr_fig.yaxis.ticker = FixedTicker(ticks=list(range(E)))
    tr_fig.add_tools(HoverTool(tooltips=[("i → j", "@i → @j"), ("P", "@value{0.000}"),
                                         ("chance", f"{1 / max(E, 1):.3f}")]))
    return dict(tl_src=tl_src, tl_fig=tl_fig, tr_src=tr_src, tr_fig=tr_fig)


def _wire(m: dict) -> None:
    """Link the views: every widget redraws everything; taps select an expert or mark the aligned token."""
    refresh = CustomJS(args=dict(m=m), code="MOE.refresh(m);")
    m["ckpt"].js_on_change("value", refresh)
    for w in ("layer", "group", "view", "sample", "expert"):
        m[w].js_on_change("value", refresh)
    m["map_src"].selected.js_on_change("indices", CustomJS(args=dict(m=m), code="MOE.tapMap(m);"))
    m["tl_src"].selected.js_on_change("indices", CustomJS(args=dict(m=m), code="MOE.tapTimeline(m);"))
    for a, b in (("tokA_src", "tokB_src"), ("tokB_src", "tokA_src")):
        m[a].selected.js_on_change("indices", CustomJS(args=dict(m=m, a=m[a], b=m[b]), code="MOE.tapToken(m, a, b);"))


def scope_note(data: dict, fetch_url: str = "") -> str:
    """The page's statement of which samples it holds (all, a stated sample, or served on request)."""
    if fetch_url:
        return (f"Served: all {data['samples_total']} samples ({data['tokens_total']} tokens) are available; each "
                "is fetched when chosen.")
    if data["sampled"]:
        return (f"<b>Sampled:</b> this page embeds {len(data['samples_index'])} of {data['samples_total']} samples "
                f"({data['tokens_embedded']} of {data['tokens_total']} tokens), whole samples taken round robin over "
                "domains (paired samples counted as one more domain), pair partners kept together. Maps, "
                "transitions and top tokens use every token. <code>moe-atlas serve RUN</code> serves every sample.")
    return f"All {data['samples_total']} samples ({data['tokens_total']} tokens) are embedded."


def build_page(data: dict, *, title: str = "moe-atlas explorer", fetch_url: str = "") -> str:
    """The explorer page (HTML text) for ``data`` from :func:`analyses.explorer_data.explorer_data`.

    ``fetch_url`` (e.g. ``"sample/{sample}.json"``): samples missing from ``data["samples"]`` are fetched
    from there (``moe-atlas serve``); empty for a standalone page.
    """
    data = dict(data)
    data.update(palette=palette(int(data["num_experts"])), wrap=WRAP, fetch_url=fetch_url)
    m = {**_widgets(data), **_map_view(data), **_across_view(data), **_token_views(data), **_timeline_views(data)}
    _wire(m)
    header = Div(text=f"<h2>{html.escape(title)}</h2><p class='moe-note' id='moe-scope'>{scope_note(data, fetch_url)} "
                      f"Routing map: {html.escape(data['map_source'])}; transitions: "
                      f"{html.escape(data['transition_source'])}. Chance usage 1/E = {data['chance']:.3f}. "
                      "Click a map cell or a timeline row to select an expert; click a token to select its top-1 "
                      "expert and mark the aligned token of the other condition.</p>", width=1100, name="header")
    layout = column(
        header,
        row(m["ckpt"], m["ckpt_div"], m["layer"], m["group"], m["view"], m["expert"]),
        row(m["map_fig"], column(m["ac_fig"], m["top_div"])),
        Div(text="<h3>Tokens</h3>"), m["sample"], m["legend"],
        row(m["tokA_fig"], m["tokB_fig"]),
        Div(text="<h3>Timeline</h3>"),
        row(m["tl_fig"], m["tr_fig"]),
    )
    doc = Document()
    doc.add_root(layout)
    doc.js_on_event("document_ready", CustomJS(args=dict(m=m), code="MOE.refresh(m);"))
    return file_html(doc, INLINE, title, template=_TEMPLATE,
                     template_variables={"explorer_json": _json_for_script(data), "explorer_js": JS})


def write_page(data: dict, path: Path, *, title: str = "moe-atlas explorer") -> Path:
    """Write the standalone page to ``path`` (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(build_page(data, title=title), encoding="utf-8")
    os.replace(tmp, path)
    return path


def report_section(layout, routing, formats: Sequence[str] = ("png",), analysis_names: Sequence[str] = ()) -> str:
    """Write ``report/explorer.html`` and the static token figures; the HTML snippet for the report's index.

    Returns "" for cubes without per-token expert ids (aggregate imports): nothing to explore token by token.
    """
    from storage import cube as cubes
    from storage.schema import is_counts_cube

    from ..explorer_data import explorer_data
    from . import tokens as token_figures

    if is_counts_cube(routing) or "expert_ids" not in routing or not routing.sizes.get("token"):
        return ""

    def result(name):
        path = layout.analysis(name)
        if name not in analysis_names or not (path / "zarr.json").exists():
            return None
        r = cubes.open_result(path)
        return None if r.attrs.get("skipped") else r

    data = explorer_data(routing, usage=result("usage"), temporal=result("temporal"))
    page = write_page(data, layout.report_dir / PAGE, title=f"moe-atlas explorer — {layout.root.name}")
    files = token_figures.figure(data, layout.figures_dir / "explorer", formats)
    imgs = "".join(f'<figure><img src="{html.escape(os.path.relpath(f, layout.report_dir))}" alt="{html.escape(Path(f).stem)}"></figure>'
                   for f in files if Path(f).suffix == ".png")
    scope = (f"{len(data['samples_index'])} of {data['samples_total']} samples embedded (sampled; "
             f"<code>moe-atlas serve</code> serves all)" if data["sampled"] else f"all {data['samples_total']} samples")
    return (f'<section id="explorer"><h2>Explore token by token</h2><p><a href="{PAGE}"><b>Open the explorer</b></a> '
            f"({scope}; {page.stat().st_size / 1e6:.1f} MB, works offline from disk): routing map with checkpoint "
            "slider, tokens coloured by their expert, per-expert timeline, transitions, and each expert across "
            f"checkpoints. Static versions of one sample below.</p>{imgs}</section>")
