"""A headless Chromium driven over the Chrome DevTools Protocol (a websocket on 127.0.0.1).

Just what the HTML report's tests and benchmark need: open a page, evaluate JavaScript after its
scripts ran, type, press keys, switch the colour scheme, take a screenshot, and see every request
the page attempted (``Network.requestWillBeSent``) and every console or CSP message
(``Log.entryAdded``). The flags keep Chromium itself off the network (no component updates,
no sync, no background requests), so a request that shows up came from the page.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-default-browser-check", "--disable-default-apps", "--disable-extensions",
         "--mute-audio", "--hide-scrollbars", "--window-size=1280,900")


def find_chromium() -> str | None:
    """Debian's chromium (``/usr/bin/chromium``) or one on PATH."""
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """One Chromium process and its first tab; use as a context manager."""

    def __init__(self, executable: str, *, timeout: float = 60.0) -> None:
        import websocket  # websocket-client

        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="ckpt-chromium-")
        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._port()
            page = self._first_page(port)
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                                  suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self._id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")

    def _port(self) -> int:
        marker = Path(self._profile) / "DevToolsActivePort"  # Chromium writes its port here
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with {self.proc.returncode} before it listened")
            if marker.exists():
                lines = marker.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.05)
        raise CDPError("chromium did not open its debugging port")

    def _first_page(self, port: int) -> dict:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as response:
                pages = [t for t in json.load(response) if t.get("type") == "page"]
            if pages:
                return pages[0]
            time.sleep(0.05)
        raise CDPError("chromium opened no page")

    # -- protocol --

    def send(self, method: str, **params) -> dict:
        self._id += 1
        ident = self._id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == ident:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})

    def _receive(self) -> dict:
        message = json.loads(self.ws.recv())
        if "method" in message:
            self.events.append(message)
        return message

    def wait_for(self, method: str, since: int = 0) -> dict:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for event in self.events[since:]:
                if event["method"] == method:
                    return event
            since = len(self.events)
            self._receive()
        raise CDPError(f"no {method} within {self.timeout} s")

    # -- what the tests do --

    def open(self, path: str | Path) -> None:
        """Load a file and wait for its load event (scripts have run by then)."""
        self.open_url(Path(path).resolve().as_uri())

    def open_url(self, url: str) -> None:
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def type_text(self, selector: str, text: str) -> None:
        """Focus an input and type into it as a user would (input events fire)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def press(self, key: str, code: int, *, text: str | None = None, shift: bool = False) -> None:
        """A key press as a keyboard makes it (``text``: the character it types, e.g. "\\r" for Enter)."""
        modifiers = 8 if shift else 0
        down = {"type": "keyDown", "text": text} if text else {"type": "rawKeyDown"}
        for event in (down, {"type": "keyUp"}):
            self.send("Input.dispatchKeyEvent", key=key, code=key, windowsVirtualKeyCode=code, modifiers=modifiers,
                      **event)

    def color_scheme(self, scheme: str) -> None:
        self.send("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": scheme}])

    def disable_scripts(self, disabled: bool = True) -> None:
        self.send("Emulation.setScriptExecutionDisabled", value=disabled)

    def screenshot(self, path: str | Path, *, full_page: bool = False) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": metrics["width"], "height": metrics["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def log_entries(self) -> list[dict]:
        return [e["params"]["entry"] for e in self.events if e["method"] == "Log.entryAdded"]

    # -- lifetime --

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

