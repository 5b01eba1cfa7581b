"""Runs the memstate CLI in a fresh process, importing this checkout's package (not an installed
one), for the tests that check exit codes and stderr lines."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, cwd, timeout=300):
    """``python -m memstate ARGS`` in ``cwd`` with PYTHONPATH set to this checkout:
    (returncode, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "memstate"] + list(args), cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr
