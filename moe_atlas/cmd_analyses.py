"""``moe-atlas analyses``: the registered analyses, one line each, with what each needs from the data."""

from __future__ import annotations

HELP = "list the registered analyses, one line each, with what they need (logits, lens, pairs, >= 2 checkpoints)"

#: cube variable -> what a user reads (and the experiment option that provides it)
VARIABLE_NEEDS = {
    "expert_weights": "expert weights",
    "router_logits": "router logits (capture.keep_router_logits)",
    "lens_logprob": "logit lens (capture.logit_lens)",
    "lens_js": "lens JS divergence (capture.js_divergence)",
    "capacity_dropped": "capacity drops (a Switch Transformers model)",
    "nll": "token NLL",
}

#: analyses that compare the two conditions' aligned samples (nothing to compute without them)
PAIRED = {"divergence"}


def add_arguments(p) -> None:
    p.add_argument("--params", action="store_true", help="also list each analysis' parameters and defaults")


def needs(analysis) -> list[str]:
    """What ``analysis`` needs beyond top-k expert ids, in words (empty: any routing cube)."""
    out = [VARIABLE_NEEDS.get(v, v) for v in analysis.requires if v != "expert_ids"]
    if analysis.name in PAIRED:
        out.append("pairs (two [conditions] and paired samples)")
    if analysis.min_checkpoints > 1:
        out.append(f">= {analysis.min_checkpoints} checkpoints")
    if analysis.min_domains > 1:
        out.append(f">= {analysis.min_domains} domains")
    return out


def lines(with_params: bool = False) -> list[str]:
    from analyses import REGISTRY

    width = max(map(len, REGISTRY))
    out = []
    for name in sorted(REGISTRY):
        a = REGISTRY[name]
        need = needs(a)
        extra = [f"uses {VARIABLE_NEEDS.get(v, v)} when present" for v in a.optional]
        text = f"{name:<{width}}  {a.title}. needs: {', '.join(need) or 'expert ids only'}"
        if extra:
            text += f"; {'; '.join(extra)}"
        if a.accepts_counts:
            text += "; runs on aggregate counts"
        out.append(text)
        if with_params:
            out += [f"{'':<{width}}    {k} = {v!r}" for k, v in a.params.items()]
    return out


def run(args) -> int:
    for line in lines(args.params):
        print(line)
    return 0
