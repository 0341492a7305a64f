"""Open an HTML file in Debian's headless Chromium: its DOM after load, console messages, and
a screenshot (``apt-get install chromium``; `.ci/run` installs it when missing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        raise AssertionError("Chromium is not installed: apt-get install -y "
                             "--no-install-recommends chromium (.ci/run does this)")
    return exe


def render(page: Path, tmp: Path) -> tuple[str, list[str], Path]:
    """(DOM after load, console lines, screenshot PNG)."""
    profile = tmp / "chrome-profile"
    shot = tmp / "page.png"
    dom = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}",
                    f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    return dom.stdout, console, shot


def is_blank(png: Path) -> bool:
    import matplotlib.image as mpimg

    pixels = mpimg.imread(png)
    return float(pixels[..., :3].std()) < 0.01
