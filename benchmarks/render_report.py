"""Renders a memstate report.html headless and checks that it looks right.

    python benchmarks/render_report.py runs/digits-reset_momentum/report.html [--out shot.png]

Checks (exit 1 on failure): every <img> the HTML references exists and is a non-blank PNG
(more than one colour, not mostly empty), the tables and the estimand line are present; then
takes a full-page screenshot with Chromium (Debian's ``chromium`` package; ``--headless``) so a
person can look at it. Without Chromium it says so and keeps the PNG checks.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys


def check_pngs(html_path: str) -> list:
    import matplotlib.image as mpimg
    import numpy as np

    base = os.path.dirname(os.path.abspath(html_path))
    text = open(html_path, encoding="utf-8").read()
    problems = []
    for needle in ("<table>", "E[M(", "memory kept minus memory perturbed", "A/A check"):
        if needle not in text:
            problems.append(f"report.html lacks {needle!r}")
    for src in re.findall(r'<img src="([^"]+)"', text):
        path = os.path.join(base, src)
        if not os.path.isfile(path):
            problems.append(f"missing image {src}")
            continue
        img = mpimg.imread(path)
        flat = img[..., :3].reshape(-1, 3)
        colours = len(np.unique((flat * 255).astype(np.uint8), axis=0))
        ink = float(np.mean(np.abs(flat - 1.0).sum(axis=1) > 0.05))  # fraction of non-white pixels
        print(f"{src}: {img.shape[1]}x{img.shape[0]}, {colours} colours, {ink:.1%} ink")
        if colours < 3 or ink < 0.01:
            problems.append(f"{src} looks blank ({colours} colours, {ink:.1%} ink)")
    return problems


def screenshot(html_path: str, out: str, width: int = 1200, height: int = 5200) -> bool:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        print("SKIPPED screenshot: no chromium on PATH (apt-get install chromium)")
        return False
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
           f"--screenshot={os.path.abspath(out)}", "file://" + os.path.abspath(html_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0 or not os.path.isfile(out):
        print(f"FAIL screenshot: {p.stderr.strip()[-500:]}")
        return False
    print(f"screenshot {out}")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="path of a report.html")
    ap.add_argument("--out", default="report.png", help="screenshot file (default report.png)")
    ap.add_argument("--height", type=int, default=5200, help="page height in pixels for the screenshot")
    args = ap.parse_args(argv)
    problems = check_pngs(args.report)
    screenshot(args.report, args.out, height=args.height)
    for p in problems:
        print("FAIL", p)
    print("render_report: " + ("PASS" if not problems else "FAIL"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
