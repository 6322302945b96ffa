"""A real headless browser for tests of pages we write: Chromium, from the system's packages (Debian:
`apt-get install chromium`; .ci/run installs it)."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Added to a copy of the page: once everything has loaded, the state of every <img> on the <body>.
PROBE = ("<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
         "JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth, i.alt]))));</script>")


def chromium() -> str:
    """The Chromium binary, or a skip that says how to get one."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")


def loaded_images(page: Path, profile: Path) -> list[list]:
    """[complete, naturalWidth, alt] of every <img> of `page` after a headless Chromium loaded it from
    its file (no network: the page must hold what it shows)."""
    probe = page.with_name(f".{page.stem}.probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        done = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(r'data-images="([^"]*)"', done.stdout)
    assert found, f"the page did not finish loading in Chromium (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(html.unescape(found.group(1)))
