"""``moe-atlas serve RUN``: the run explorer with every sample, read lazily from the Zarr cubes.

Binds 127.0.0.1 only. ``GET /`` is the explorer page without embedded samples;
``GET /sample/<id>.json`` is one sample's record
(:func:`analyses.explorer_data.sample_record`), read from ``routing.zarr`` when asked.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HELP = "serve a run's explorer on 127.0.0.1 with every sample, read lazily from its Zarr cubes"
HOST = "127.0.0.1"


def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="the run folder (the experiment's output_dir)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port; default 8765)")


def make_server(run, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``run`` on 127.0.0.1 (not started: call ``serve_forever``)."""
    from analyses.explorer_data import explorer_data, sample_record, token_columns
    from analyses.figures.explorer import build_page
    from storage import cube as cubes
    from storage.layout import RunLayout

    layout = RunLayout(Path(run))
    if not (layout.routing / "zarr.json").exists():
        raise FileNotFoundError(f"{layout.routing}: no routing cube (is {run} a run folder?)")
    routing = cubes.open_routing(layout.routing)

    def result(name):
        path = layout.analysis(name)
        if not (path / "zarr.json").exists():
            return None
        r = cubes.open_result(path)
        return None if r.attrs.get("skipped") else r

    cols = token_columns(routing)
    page = build_page(explorer_data(routing, usage=result("usage"), temporal=result("temporal"), embed=False),
                      title=f"moe-atlas explorer — {layout.root.name} (served)",
                      fetch_url="sample/{sample}.json").encode()
    known = {int(s) for s in cols["sample"]}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path in ("/", "/index.html", "/explorer.html"):
                return self._send(200, page, "text/html; charset=utf-8")
            if self.path == "/favicon.ico":  # browsers ask for it; a 404 would be a console error on the page
                return self._send(204, b"", "image/x-icon")
            hit = re.fullmatch(r"/sample/(\d+)\.json", self.path)
            if hit and int(hit.group(1)) in known:
                with lock:
                    rec = sample_record(routing, int(hit.group(1)), cols)
                return self._send(200, json.dumps(rec, allow_nan=False).encode(), "application/json")
            return self._send(404, b"not found", "text/plain")

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer((HOST, port), Handler)


def run(args) -> int:
    server = make_server(args.run, args.port)
    print(f"moe-atlas serve: http://{HOST}:{server.server_address[1]}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
