"""Screenshot of the demo report: open reports/demo/index.html in headless Chromium, save reports/demo/screenshot.png.

Run ``influence demo`` first. Needs Chromium (Debian: ``apt-get install chromium``);
looks for ``chromium``, ``chromium-browser``, ``google-chrome`` on PATH, or ``--browser``.
The browser gets a throw-away profile and no network-facing features.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def find_browser(given: str | None) -> str:
    """Path of a Chromium-family browser, or exit 2 with a one-line hint."""
    for name in ([given] if given else []) + list(BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("screenshot: error: no Chromium found; install it (Debian: apt-get install chromium) or pass --browser")


def screenshot(html: Path, png: Path, *, browser: str, width: int, height: int, timeout: float) -> None:
    """Render ``html`` headless at ``width``×``height`` and write ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="influence-chromium-") as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ]
        subprocess.run(command, check=True, timeout=timeout, capture_output=True)
    if not png.is_file() or png.read_bytes()[:8] != PNG_SIGNATURE:
        sys.exit(f"screenshot: error: {browser} wrote no PNG at {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=REPO_ROOT / "reports" / "demo" / "index.html")
    parser.add_argument("--out", type=Path, help="PNG to write (default: screenshot.png beside the HTML)")
    parser.add_argument("--browser", help="browser executable (default: first Chromium on PATH)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before the browser is killed")
    parser.add_argument("--quick", action="store_true", help="accepted for `influence bench --quick`; no effect")
    args = parser.parse_args()
    if not args.html.is_file():
        sys.exit(f"screenshot: error: {args.html} does not exist; run `influence demo` first")
    out = args.out or args.html.with_name("screenshot.png")
    screenshot(
        args.html, out, browser=find_browser(args.browser), width=args.width, height=args.height, timeout=args.timeout
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
