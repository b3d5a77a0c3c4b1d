"""Explorer page size and open time in headless Chromium (JSON on stdout).

    python -m bench.explorer [RUN]     # RUN: a run folder (default: a seeded mock cube)

Open time: from navigation to the routing map filled by the page's JavaScript
(median of 3 opens, fresh page each), and the renderer's main-thread busy time
until then (Chromium's ``TaskDuration``; on a loaded machine the open time
grows with the load, this much less). Needs the system ``chromium``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

READY = ("window.Bokeh !== undefined && Bokeh.documents.length > 0 && "
         "Bokeh.documents[0].get_model_by_name('map_source').data.value.length > 0")


def main(argv=None) -> int:
    from browser_helpers import Page, chromium

    from analyses.explorer_data import explorer_data
    from analyses.figures.explorer import write_page
    from storage import cube as cubes
    from storage.layout import RunLayout
    from storage.schema import mock_cube

    parser = argparse.ArgumentParser(prog="python -m bench.explorer", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", metavar="RUN", help="a run folder (default: a seeded mock cube)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    if args.run:
        layout = RunLayout(Path(args.run))
        routing = cubes.open_routing(layout.routing)
        res = {n: cubes.open_result(layout.analysis(n)) if (layout.analysis(n) / "zarr.json").exists() else None
               for n in ("usage", "temporal")}
        data = explorer_data(routing, usage=res["usage"], temporal=res["temporal"])
        what = str(layout.root)
    else:
        data = explorer_data(mock_cube(n_checkpoints=4, n_samples=40, seq_len=128, n_layers=4, num_experts=8, top_k=2))
        what = "mock_cube(4 checkpoints, 40 samples × 128 tokens, 4 layers, 8 experts, top-2)"
    out = Path(tempfile.mkdtemp()) / "explorer.html"
    write_page(data, out)
    build_s = time.perf_counter() - t0
    result = {"run": what, "page_bytes": out.stat().st_size, "tokens_embedded": data["tokens_embedded"],
              "tokens_total": data["tokens_total"], "build_s": round(build_s, 3)}
    binary = chromium()
    if binary:
        times, busy = [], []
        for _ in range(3):
            p = Page(binary)
            try:
                p.call("Performance.enable")
                times.append(p.open(out.as_uri(), READY))
                metrics = {m["name"]: m["value"] for m in p.call("Performance.getMetrics")["metrics"]}
                busy.append(metrics.get("TaskDuration", float("nan")))
                result["console_errors"] = p.errors
            finally:
                p.close()
        result["open_s_median"] = round(statistics.median(times), 3)
        result["open_s"] = [round(t, 3) for t in times]
        # the page's main-thread busy time until ready: less sensitive than open_s to other load on the machine
        result["main_thread_s_median"] = round(statistics.median(busy), 3)
    else:
        result["open_s_median"] = None
        result["note"] = "no chromium binary"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
