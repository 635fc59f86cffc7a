"""Render a page in headless Chromium through the DevTools protocol, for the report tests.

Chromium is started with ``--remote-debugging-pipe``: it reads JSON commands, each ended by
a NUL byte, on file descriptor 3 and writes replies and events on 4. :func:`render` opens
the page in a new tab, waits for its load event, and returns what the tests check: a
full-page screenshot (PNG bytes), every console error, uncaught exception and failed load
that the page produced, and each ``<img>``'s loaded size.

The browser is ``chromium-headless-shell`` or ``chromium`` (Debian's packages of those
names; ``SNL_CHROMIUM`` names another binary).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The browser binary to use, or None."""
    explicit = os.environ.get("SNL_CHROMIUM")
    if explicit:
        return explicit
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _high(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


@dataclass
class Rendered:
    screenshot: bytes  #: PNG of the whole page
    errors: list[str] = field(default_factory=list)  #: console errors, exceptions, failed loads
    images: list[dict] = field(default_factory=list)  #: {"alt", "width", "height", "complete"}
    title: str = ""


class _Pipe:
    def __init__(self, binary: str, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child's ends go above 9, so that the shell's "3<&N 4>&M" cannot overwrite one
        # with the other (the pipes themselves may have got descriptors 3 and 4).
        to_browser_r, from_browser_w = (_high(fd) for fd in (to_browser_r, from_browser_w))
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        # bash (dash takes single-digit descriptors only) puts the pipes on descriptors 3
        # (commands in) and 4 (replies out).
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}', *args],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read(timeout)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self, timeout: float) -> dict:
        import select

        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5.0)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


_IMAGES = """JSON.stringify(Array.from(document.images).map(i => ({
  alt: i.alt, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete})))"""


def render(path: str | Path, width: int = 1400, timeout: float = 60.0) -> Rendered:
    """Open ``path`` (a local HTML file) in headless Chromium and report on it."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found (" + ", ".join(NAMES) + ")")
    with tempfile.TemporaryDirectory(prefix="snl-chromium-") as profile:
        pipe = _Pipe(binary, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.send("Target.attachToTarget",
                                {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                      session=session)
            pipe.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout)
            images = json.loads(pipe.send("Runtime.evaluate", {"expression": _IMAGES},
                                          session=session)["result"]["value"])
            title = pipe.send("Runtime.evaluate", {"expression": "document.title"},
                              session=session)["result"]["value"]
            shot = pipe.send("Page.captureScreenshot",
                             {"format": "png", "captureBeyondViewport": True},
                             session=session, timeout=timeout)
            errors = _errors(pipe.events)
        finally:
            pipe.close()
    return Rendered(base64.b64decode(shot["data"]), errors, images, title)


def _errors(events: list[dict]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + str(params.get("exceptionDetails", {}).get("text")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            found.append("log: " + str(params["entry"].get("text")))
        elif method == "Network.loadingFailed":
            found.append("load failed: " + str(params.get("errorText")))
    return found
