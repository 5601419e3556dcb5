"""A real headless Chromium (Debian's ``chromium``) that opens a page and answers questions about what
it rendered: layout boxes, visible text, a screenshot.

It speaks the DevTools protocol over a pipe (``--remote-debugging-pipe``: fd 3 in, fd 4 out, each
message JSON ending in NUL), so it listens on no port, and it runs in a network namespace of its own
(``unshare --net``: only a loopback that is down) so a report that tried to fetch anything, or the
browser's own background services, reach nothing at all.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Background services off: nothing to reach anyway, and they would only slow the start.
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in CI; the network namespace is the isolation that matters here
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)


class BrowserError(RuntimeError):
    pass


def chromium_binary() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One page in a headless Chromium; use as a context manager."""

    def __init__(self, width_px: int = 1280, height_px: int = 900, timeout_s: float = 60.0) -> None:
        binary = chromium_binary()
        if binary is None:
            raise BrowserError("chromium is not installed; apt-get install chromium (.ci/run does)")
        self.timeout_s = timeout_s
        self._profile = tempfile.mkdtemp(prefix="kubemeter-chromium-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # Above 9, so bash's "3<&N 4>&M" below cannot overwrite one end with the other.
        read_fd = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
        write_fd = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
        os.close(to_browser_read)
        os.close(from_browser_write)
        argv = [binary, *FLAGS, f"--user-data-dir={self._profile}", f"--window-size={width_px},{height_px}"]
        # DevTools reads commands on fd 3 and writes replies on fd 4.
        argv = ["bash", "-c", f'exec "$0" "$@" 3<&{read_fd} 4>&{write_fd} {read_fd}<&- {write_fd}>&-', *argv]
        if os.geteuid() == 0 and shutil.which("unshare"):
            argv = ["unshare", "--net", "--", *argv]
        self._log = Path(self._profile) / "chromium.log"
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(read_fd, write_fd),
            )
        os.close(read_fd)
        os.close(write_fd)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self._session = attached["sessionId"]
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width_px, "height": height_px, "deviceScaleFactor": 1, "mobile": False},
        )

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)

    # -- protocol ---------------------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session is not None and not method.startswith("Target."):
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline or self.process.poll() is not None:
                tail = self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""
                raise BrowserError(f"chromium did not answer in {self.timeout_s:.0f} s:\n{tail}")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError("chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    # -- what a test asks -------------------------------------------------------------------------

    def open(self, path: Path) -> None:
        """Load a local file and wait until it has loaded and laid out."""
        self.call("Page.navigate", {"url": path.resolve().as_uri()})
        deadline = time.monotonic() + self.timeout_s
        while self.evaluate("document.readyState") != "complete":
            if time.monotonic() > deadline:
                raise BrowserError(f"{path} did not finish loading")
            time.sleep(0.05)

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value in the page (returned by value, as JSON)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> tuple[int, int]:
        """The whole page as a PNG; returns its CSS size (width, height)."""
        metrics = self.call("Page.getLayoutMetrics")["cssContentSize"]
        width, height = int(metrics["width"]), int(metrics["height"])
        shot = self.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return width, height


# Questions the report tests ask of a rendered page, as JavaScript expressions.
ROW_CELLS = (
    "[...document.querySelectorAll('table.%s tbody tr')].map(tr => [...tr.cells].map(c => c.innerText))"
)
BAR_BOXES = (
    "[...document.querySelectorAll('svg#%s rect.bar')].map(r => {const b = r.getBoundingClientRect();"
    " return [b.x, b.y, b.width, b.height]})"
)


def element_box(browser: Browser, selector: str) -> list[float]:
    """(x, y, width, height) in CSS pixels of the first element matching ``selector``."""
    box: list[float] = browser.evaluate(
        f"(() => {{const b = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
        " return [b.x, b.y + window.scrollY, b.width, b.height]})()"
    )
    return box


def ink_fraction(png: Path, box: list[float]) -> float:
    """Share of the pixels inside ``box`` (x, y, width, height, CSS px) that are not page white."""
    from PIL import Image

    x, y, width, height = (int(v) for v in box)
    with Image.open(png) as image:
        histogram = image.convert("L").crop((x, y, x + width, y + height)).histogram()
    return sum(histogram[:240]) / max(sum(histogram), 1)
