"""The demo model's training curve: LM loss (and the load-balancing loss) per step, held-out loss per domain.

Drawn from the demo's ``training_log.json`` (``capture/demo/train.py`` writes
it): ``{"steps": [{"step", "loss", "aux_loss"?}, ...], "checkpoints": [{"step",
"eval_nll": {domain: nats/token}}, ...]}``. The report calls :func:`figure` when
the run trained a model; an imported trace has no such log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from . import plotting


def figure(log: Mapping, out_dir: Path, formats: Sequence[str] = ("png",)) -> tuple[list[Path], dict]:
    """Write ``training_loss.<fmt>`` under ``out_dir``; return the files and the first/last LM loss.

    Returns ``([], {})`` when the log has no per-step rows.
    """
    rows = log.get("steps") or []
    if not rows or not isinstance(rows[0], Mapping):
        return [], {}
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    aux = [r.get("aux_loss") for r in rows]
    ck = log.get("checkpoints") or []
    held_out = bool(ck) and "eval_nll" in ck[0]
    with plotting.style():
        fig, axes = plotting.new_figure(1, 2 if held_out else 1, panel_size=(3.6, 2.6) if held_out else (7.2, 2.6))
        ax = axes[0, 0]
        handles = ax.plot(steps, loss, label="LM loss (train)")
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy (nats/token)")
        if any(a is not None for a in aux):
            ax2 = ax.twinx()
            ax2.grid(False)
            # the log names its aux loss (transformers' definition, ≈ k at balance, not the balance analysis' 1)
            label = str(log.get("aux_loss_label") or "load-balancing loss")
            handles += ax2.plot(steps, aux, color="0.5", lw=1, ls="--", label=label)
            ax2.set_ylabel("aux loss (dashed)")
            ax2.spines["right"].set_visible(True)
        ax.legend(handles=handles, frameon=False, loc="upper right", fontsize=6)
        ax.set_title("Training loss")
        if held_out:
            ax3 = axes[0, 1]
            for dom in ck[0]["eval_nll"]:
                ax3.plot([c["step"] for c in ck], [c["eval_nll"][dom] for c in ck], marker="o",
                         label=plotting.display_label(dom))
            ax3.set_xlabel("checkpoint step")
            ax3.set_ylabel("held-out NLL (nats/token)")
            ax3.set_title("Held-out loss by domain")
            ax3.legend(frameon=False)
        files = plotting.savefig(fig, out_dir, "training_loss", formats)
    return files, {"final_lm_loss": float(loss[-1]), "initial_lm_loss": float(loss[0])}
