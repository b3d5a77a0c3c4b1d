"""Static token figures for print: one sample's token × expert routing heatmap and per-expert timeline.

Drawn from the explorer's data (:func:`analyses.explorer_data.explorer_data`):
the sample is the first of a pair's condition A when the run has pairs, else
the first embedded sample; the checkpoint is the last one.

* ``tokens_heatmap``: for each MoE layer (up to 4, evenly spread), expert ×
  token, cell = weight the expert receives for that token (0 = not routed),
  first :data:`MAX_TOKENS` tokens, token text on the x axis.
* ``tokens_timeline``: at the middle layer, one row per expert (up to 16 most
  active), the weight it receives along every token of the sample — seed 002's
  per-expert activation timeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import plotting

MAX_TOKENS = 48
MAX_LAYERS = 4
MAX_EXPERTS = 16


def pick_sample(data: dict) -> dict | None:
    """The sample record the static figures show (see module doc); None when nothing is embedded."""
    index = data.get("samples_index", [])
    first = next((e for e in index if e["partner"] >= 0 and e["condition"]), index[0] if index else None)
    if first is None:
        return None
    return data["samples"].get(str(first["sample"]))


def activation(rec: dict, c: int, li: int, num_experts: int) -> np.ndarray:
    """(expert, token) weight received by each expert at checkpoint ``c``, layer index ``li`` (1 when no weights)."""
    ids = np.asarray(rec["ids"][c][li], dtype=int)  # (token, k)
    w = (np.asarray(rec["weights"][c][li], dtype=float) if rec.get("weights") is not None
         else np.ones(ids.shape))
    w = np.nan_to_num(w, nan=0.0)
    out = np.zeros((num_experts, ids.shape[0]))
    t, k = np.nonzero((ids >= 0) & (ids < num_experts))
    np.add.at(out, (ids[t, k], t), w[t, k])
    return out


def _label(text: str) -> str:
    s = text.replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u2423")
    return s if s else "\u2205"


def figure(data: dict, out_dir: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write the two static figures of :func:`pick_sample`; [] when no sample is embedded."""
    rec = pick_sample(data)
    if rec is None or not rec["text"]:
        return []
    E, layers = int(data["num_experts"]), list(data["layers"])
    c = len(data["checkpoints"]) - 1
    ck = f"{data['checkpoints'][c]} (step {data['steps'][c]})"
    what = f"sample {rec['sample']} · {rec['domain']}" + (f" · {rec['condition']}" if rec["condition"] else "")
    paths: list[Path] = []
    chosen = sorted(set(np.linspace(0, len(layers) - 1, min(MAX_LAYERS, len(layers))).round().astype(int)))
    T = min(len(rec["text"]), MAX_TOKENS)
    with plotting.style():
        fig, axes = plotting.new_figure(len(chosen), 1, panel_size=(7.2, 0.45 + 0.16 * E), sharex=True, squeeze=False)
        for ax, li in zip(axes[:, 0], chosen):
            a = activation(rec, c, li, E)[:, :T]
            im = ax.imshow(a, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_yticks(range(E) if E <= 16 else range(0, E, max(E // 8, 1)))
            ax.set_ylabel(f"layer {layers[li]}\nexpert")
        ax = axes[-1, 0]
        ax.set_xticks(range(T))
        ax.set_xticklabels([_label(t) for t in rec["text"][:T]], rotation=90, fontsize=5, family="monospace")
        ax.set_xlabel("token (first %d of %d)" % (T, len(rec["text"])))
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="weight received", shrink=0.8)
        fig.suptitle(f"Token × expert routing of {what}, {ck}\n(cell: routing weight the expert receives; white = not routed)")
        paths += plotting.savefig(fig, out_dir, "tokens_heatmap", formats)

        li = len(layers) // 2
        a = activation(rec, c, li, E)
        order = np.argsort(-a.sum(axis=1), kind="stable")[:MAX_EXPERTS]
        experts = sorted(order.tolist())
        fig, axes = plotting.new_figure(len(experts), 1, panel_size=(7.2, 0.32), sharex=True, squeeze=False)
        x = np.arange(a.shape[1])
        colours = plotting.OKABE_ITO
        for i, (ax, e) in enumerate(zip(axes[:, 0], experts)):
            ax.fill_between(x, a[e], step="mid", color=colours[i % len(colours)], alpha=0.8, linewidth=0)
            ax.set_ylim(0, 1.05)
            ax.set_yticks([])
            ax.set_ylabel(f"e{e}", rotation=0, ha="right", va="center")
            for s in ("top", "right"):
                ax.spines[s].set_visible(False)
        axes[-1, 0].set_xlabel("token index in sample")
        shown = "" if len(experts) == E else f" ({len(experts)} most active of {E} experts)"
        fig.suptitle(f"Per-expert activation along {what}, layer {layers[li]}, {ck}{shown}\n"
                     "(height: routing weight received, 0–1; gaps: expert not among the top-k)")
        paths += plotting.savefig(fig, out_dir, "tokens_timeline", formats)
    return paths
