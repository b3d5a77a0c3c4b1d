"""``moe-atlas verify RUN``: check every store of a run against its manifests (full checksums).

Exit status 0 when everything verifies; 1 with one line per problem on stdout
(store, variable, region, and the command that fixes it); 2 when RUN is not a
run folder (one line on stderr). ``--quick`` checks only chunk keys and sizes
(what every open does); ``--repair`` then un-marks or removes exactly the
damaged parts, so that rerunning the experiment rebuilds them.
"""

from __future__ import annotations

import sys

HELP = "verify a run folder's stores against their manifests (exit 1 and one line per problem if damaged)"


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="the run folder (the experiment's output_dir)")
    p.add_argument("--quick", action="store_true", help="list chunk objects and compare sizes only (no reading)")
    p.add_argument("--repair", action="store_true",
                   help="un-mark damaged checkpoints / remove damaged results so that the next run rebuilds them")


def run(args) -> int:
    from storage.ownership import rerun_command
    from storage.verify import repair, verify_run

    problems, counts = verify_run(args.run, full=not args.quick)
    for p in problems:
        print(p.line())
    if problems and args.repair:
        for line in repair(args.run, problems):
            print(f"repaired: {line}", file=sys.stderr)
        print(f"moe-atlas verify: now run: {rerun_command(args.run)}", file=sys.stderr)
        return 1
    what = f"{counts['regions']} captured checkpoint(s), {counts['results']} result store(s)"
    if problems:
        print(f"moe-atlas verify: {len(problems)} problem(s) in {args.run} ({what} checked)", file=sys.stderr)
        return 1
    print(f"{args.run}: ok ({what} verified{' (sizes only)' if args.quick else ''})")
    return 0
