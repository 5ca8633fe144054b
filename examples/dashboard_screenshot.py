"""Open a study in optuna-dashboard with headless Chromium: a screenshot of its main page (the objective's history,
the knobs' importance) and the HTML of that page and of its trials list, to check what they show.

    python examples/dashboard_screenshot.py sqlite:///results/default/study.db results/dashboard.png

Needs ``pip install optuna-dashboard`` and Chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PAGES = {"study": "dashboard/studies/{study_id}", "trials": "dashboard/studies/{study_id}/trials"}
"""optuna-dashboard's pages of a study: its main page (history, importance, timeline) and its list of trials (each
with its objective values, per-epoch values, parameters and user attributes)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chromium(url: str, *options: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``, waiting up to 20 s of the page's own time for its scripts to draw it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("error: Chromium not found; apt-get install chromium")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=20000", "--window-size=1500,1100", *options, url],
                          capture_output=True, text=True, timeout=120)


def capture(storage: str, png: Path, study_id: int = 1) -> dict[str, str]:
    """Serve ``storage`` with optuna-dashboard, save the main page of study ``study_id`` as ``png`` and return the
    HTML of each of :data:`PAGES`, by name."""
    port = free_port()
    serve = "import sys, optuna_dashboard; optuna_dashboard.run_server(sys.argv[1], '127.0.0.1', int(sys.argv[2]))"
    server = subprocess.Popen([sys.executable, "-c", serve, storage, str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "api/studies", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"error: optuna-dashboard stopped: {server.stderr.read().decode()[-500:]}")
                time.sleep(0.3)
        urls = {name: base + page.format(study_id=study_id) for name, page in PAGES.items()}
        chromium(urls["study"], f"--screenshot={png.resolve()}")
        return {name: chromium(url, "--dump-dom").stdout for name, url in urls.items()}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("storage", help="the study's storage URL")
    parser.add_argument("png", type=Path, help="where the screenshot goes")
    parser.add_argument("--study-id", type=int, default=1, help="the study's id in the storage (default: 1)")
    args = parser.parse_args()
    pages = capture(args.storage, args.png, args.study_id)
    sizes = ", ".join(f"{name} ({len(html):,} characters)" for name, html in pages.items())
    print(f"wrote {args.png}; pages: {sizes}")


if __name__ == "__main__":
    main()
