"""Playwright on Debian's Chromium (browser downloads do not work here; `make test` installs
the distribution's package), the vendored axe-core scan, and small page helpers shared by
tests/e2e/test_playground.py and bench/playground_screenshots.py."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

AXE = Path(__file__).resolve().parent / "vendor" / "axe-core" / "axe.min.js"
SERIOUS = ("serious", "critical")


def chromium_path() -> str:
    """The system Chromium; a clear error if the set-up did not install it."""
    found = os.environ.get("ALIGNSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found is None:
        raise RuntimeError("Chromium not found: `make test` installs it (apt-get install -y chromium); "
                           "or set ALIGNSERVE_CHROMIUM to a Chromium binary")
    return found


def launch(playwright):
    # NOTE: --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    return playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])


def connect(page, base_url: str, api_key: str | None) -> None:
    """Open the playground, give it the key, wait until it has built itself."""
    page.goto(base_url + "/playground")
    if api_key:
        page.wait_for_selector("#conn:has-text('needs an API key')")
        page.fill("#api-key", api_key)
        page.click("#key-form button[type=submit]")
    page.wait_for_selector("body[data-connected=true]")


def send(page, text: str, timeout_ms: int = 120_000):
    """Send a chat turn; return the finished assistant message (a Locator)."""
    before = page.locator("li.msg.assistant").count()
    page.fill("#prompt", text)
    page.click("#send")
    reply = page.locator("li.msg.assistant").nth(before)
    page.wait_for_function("(el) => el.dataset.done === 'true' || el.dataset.error !== undefined",
                           arg=reply.element_handle(timeout=timeout_ms), timeout=timeout_ms)
    return reply


def axe_violations(page, impacts: tuple[str, ...] = SERIOUS) -> list[dict]:
    """axe-core's violations of the page at these impacts (id, impact, help, nodes' targets)."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "targets": [n["target"] for n in v["nodes"]][:5]}
            for v in result["violations"] if v["impact"] in impacts]


def horizontal_overflow(page) -> int:
    """Pixels the page is wider than its viewport (0: no horizontal scrolling)."""
    return page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
