"""Asynchronous GRPO as a user runs it (`raylign train ... algorithm.max_staleness=1`, tiny-random-llama, relative
paths): the generators sample the next step's prompts while a step trains, so from step 2 on every sample is one
policy version behind the trainer, the loss weights it by truncated importance sampling, and the run logs it.
The run is float32 end to end (model.dtype, trainer.bf16=false): syncs and the export are float32 too, so the
sync canary sees the trainer's own log-probs (bf16 copies of fp32-trained weights were up to 1.5 nats off)."""

import json
import math

from safetensors import safe_open

from tests.integration.helpers import CLI_GRPO, PRESET, raylign_cli


def test_max_staleness_one_trains_on_samples_one_version_behind(tmp_path):
    raylign_cli(tmp_path, "train", str(PRESET), *CLI_GRPO, "algorithm.max_staleness=1", "algorithm.tis_cap=2.0",
                "train.checkpoint_every=0", "model.dtype=float32", "trainer.bf16=false", "output_dir=runs/async")
    run = tmp_path / "runs/async"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    # step 1 samples now (v0); step 2's prompts were sampled during step 1's training (v0, trainer at v1);
    # step 3's during step 2's (v1, trainer at v2)
    assert [sorted({r["policy_version"] for r in rows if r["step"] == s}) for s in (1, 2, 3)] == [[0], [0], [1]]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [row["metrics"] for row in steps if row["kind"] == "grpo"]
    assert [m["async/staleness_mean"] for m in steps] == [0.0, 1.0, 1.0]
    assert all(m["async/dropped"] == 0 and m["async/discarded"] == 0 for m in steps)
    assert steps[0]["async/generate_ahead_s"] > 0  # step 2's batch was sampled during step 1
    for m in steps:
        assert math.isfinite(m["tis/ratio_mean"]) and m["tis/ratio_mean"] > 0 and 0 <= m["tis/capped_fraction"] <= 1
    gaps = [m["sync/canary_gap"] for m in steps if "sync/canary_gap" in m]
    assert gaps and max(gaps) < 0.01, gaps
    assert json.loads((run / "final_model/config.json").read_text())["dtype"] == "float32"
    with safe_open(str(run / "final_model/model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
