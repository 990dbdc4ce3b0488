"""Headless Chromium (Debian's package) for report tests: a screenshot and the DOM after load."""

import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]


def render(page: Path, workdir: Path) -> tuple[Path, str]:
    """(screenshot PNG, DOM after the load event) of a local HTML file."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (.ci/run installs Debian's chromium)"
    png = workdir / "shot.png"
    common = [chromium, *FLAGS, f"--user-data-dir={workdir / 'profile'}"]
    subprocess.run([*common, f"--screenshot={png}", "--window-size=1400,1600", page.as_uri()],
                   check=True, capture_output=True, timeout=180)
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=180).stdout
    return png, dom
