"""Headless Chromium (Debian's package) for report tests: a screenshot and the DOM after load.

Outside CI a machine without Chromium skips the browser check with the command that installs it; under CI
(``CI`` set, as ``.ci/run`` runs) a missing Chromium fails the test, so the check never silently disappears.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]
INSTALL = "sudo apt-get install chromium (Debian/Ubuntu)"


def require_chromium() -> str:
    """The Chromium binary; else skip (outside CI) or fail (under CI), naming the install command."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        return chromium
    msg = f"headless Chromium is needed for the report check: {INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def render(page: Path, workdir: Path) -> tuple[Path, str]:
    """(screenshot PNG, DOM after the load event) of a local HTML file, in a 1,400-px-wide window."""
    chromium = require_chromium()
    png = workdir / "shot.png"
    common = [chromium, *FLAGS, f"--user-data-dir={workdir / 'profile'}"]
    subprocess.run([*common, f"--screenshot={png}", "--window-size=1400,1600", page.as_uri()],
                   check=True, capture_output=True, timeout=180)
    dom = subprocess.run([*common, "--dump-dom", "--window-size=1400,1600", page.as_uri()], check=True,
                         capture_output=True, text=True, timeout=180).stdout
    return png, dom
