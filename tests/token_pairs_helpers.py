"""Token pairs of a paired cube by explicit loops: the reference of the divergence and lens tests."""

from __future__ import annotations


def pairs_bruteforce(ds):
    """{view: [(a_token, b_token, pair id)]} from the coordinates, by explicit loops."""
    cond, pair = ds["condition"].values, ds["pair"].values
    aligned, canonical, sample = ds["aligned_token"].values, ds["canonical"].values, ds["sample"].values
    canon = [(t, int(aligned[t]), pair[t]) for t in range(cond.size)
             if cond[t] == "A" and aligned[t] >= 0 and canonical[t] and cond[aligned[t]] == "B"]
    last = {}
    for t in range(cond.size):
        if canonical[t] and cond[t] in ("A", "B"):
            last[(pair[t], cond[t])] = t  # the last canonical token seen of that sample wins
    pairs = sorted({p for p, _ in last})
    return {"canonical": canon,
            "last_canonical": [(last[(p, "A")], last[(p, "B")], p) for p in pairs if (p, "B") in last]}
