"""Headless Chromium driven over the Chrome DevTools Protocol (``websockets``), for tests/test_explorer.py.

Uses the system browser (Debian ``chromium``, installed by ``.ci/run``); nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

from websockets.sync.client import connect


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Page:
    """One page of a fresh headless Chromium; console errors and exceptions are collected in ``errors``."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="moe-cdp-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "--window-size=1200,2000",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = self.proc.stderr.readline()
            hit = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(hit.group(1)) if hit else None
        if port is None:
            self.close()
            raise RuntimeError("chromium did not start its DevTools endpoint")
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
        self.ws = connect(url, max_size=None, open_timeout=20)
        self.n = 0
        self.errors: list[str] = []
        self.events: list[dict] = []
        for m in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(m)

    def _event(self, msg: dict) -> None:
        self.events.append(msg)
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(p.get("exceptionDetails", {}))[:500])
        elif method == "Runtime.consoleAPICalled" and p.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            self.errors.append(p["entry"].get("text", ""))

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.time(), 0.01)))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        for m in self.events:
            if m.get("method") == method:
                self.events.remove(m)
                return m
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.time(), 0.01)))
            if msg.get("method") == method:
                return msg
            self._event(msg)

    def eval(self, expression: str, timeout: float = 60):
        r = self.call("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = 60) -> float:
        """Navigate and wait until the JS expression ``ready`` is true; seconds from navigation to ready."""
        t0 = time.perf_counter()
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", timeout)
        while not self.eval(ready):
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{url}: not ready after {timeout} s ({ready})")
            time.sleep(0.02)
        return time.perf_counter() - t0

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)
