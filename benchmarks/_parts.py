"""Shared by the benchmarks: run one part in a fresh process, so engines and clusters never overlap."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_part(script: str, name: str) -> dict:
    """Run ``script --part name``; its last ``RESULT {json}`` line is the result."""
    out = subprocess.run([sys.executable, script, "--part", name], capture_output=True, text=True,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"part {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])
