"""Bad input stops `raylign` with one line naming the file, row or field, exit code 2, before Ray starts."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylign import storage
from raylign.config import load_config
from raylign.orchestrator.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
GRPO = str(ROOT / "configs/grpo_arith.yaml")


def _fails(cwd: Path, *args: str) -> tuple[str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raylign", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]  # one line, no traceback
    assert "Ray instance" not in proc.stderr and "ray" not in proc.stdout.lower()
    return lines[0], seconds


def _written_checkpoint(run: Path, **meta) -> Path:
    """A run folder whose checkpoint was written by the real save path (trainer files stand in as bytes)."""
    cfg = load_config(GRPO, [f"output_dir={run}"], environ={}).absolutized()

    def write_trainer(folder: str) -> dict:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "trainer_model.safetensors").write_bytes(os.urandom(4096))
        return storage.file_entries(folder)

    state = {"policy_version": 2, "data": {"epoch": 0, "position": 12}, "config": cfg.model_dump(mode="json")}
    meta = {"world_size": cfg.trainer.num_workers, "model": cfg.model.name, **meta}
    return Path(save_checkpoint(run / "checkpoints", 2, write_trainer, state, keep=2, meta=meta))


@pytest.mark.parametrize("args, expected", [
    (["eval", str(ROOT / "configs/eval_gsm8k.yaml"), "dataset.path=empty.jsonl"],
     "raylign: DataError: empty.jsonl: file is empty (dataset.path)"),
    (["train", GRPO, "dataset.path=empty.jsonl"], "raylign: DataError: empty.jsonl: file is empty (dataset.path)"),
    (["train", GRPO, "env.num_problems=4"],
     "raylign: DataError: env.name=arith (built-in data): split 'train' yields only 4 problems; one training step "
     "(algorithm.prompts_per_step=6) needs at least 6"),
    (["train", GRPO, "algorithm.group_size=1"],
     "raylign: config error: override 'algorithm.group_size=1': algorithm.group_size must be >= 2 for grpo (advantages compare samples)"),
    (["train", GRPO, "train.eval_limit=0"], "raylign: config error: override 'train.eval_limit=0': train.eval_limit=0 "
                                            "leaves nothing to evaluate"),
])
def test_bad_data_and_config(tmp_path, args, expected):
    (tmp_path / "empty.jsonl").write_text("")
    line, _ = _fails(tmp_path, *args)
    assert line.startswith(expected.replace("empty.jsonl", str(tmp_path / "empty.jsonl"))), line


def test_resume_from_another_worker_count_model_or_algorithm(tmp_path):
    ckpt = _written_checkpoint(tmp_path / "run")
    resume = ["train", GRPO, f"output_dir={tmp_path}/run"]
    line, _ = _fails(tmp_path, *resume, "trainer.num_workers=2", "--resume")
    assert line.startswith(f"raylign: CheckpointError: checkpoint {ckpt} was written by 1 trainer workers"), line
    assert "trainer.num_workers" in line
    line, _ = _fails(tmp_path, *resume, "model.name=tiny-random-llama", "--resume")
    assert "model" in line and "smollm2-135m-instruct" in line and "tiny-random-llama" in line, line
    line, _ = _fails(tmp_path, *resume, "algorithm.name=rloo", "--resume")
    assert line == (f"raylign: config error: --resume from {ckpt}: it was written with algorithm.name='grpo', this "
                    "run has algorithm.name='rloo'; put it back or use a new output_dir")


def test_resume_from_a_tampered_or_truncated_checkpoint(tmp_path):
    ckpt = _written_checkpoint(tmp_path / "run")
    weights = ckpt / "trainer_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    resume = ["train", GRPO, f"output_dir={tmp_path}/run", "--resume"]
    line, _ = _fails(tmp_path, *resume)
    assert line == (f"raylign: CheckpointError: checkpoint {ckpt}: trainer_model.safetensors does not match its "
                    "sha256 in the manifest (altered or corrupted)")
    weights.write_bytes(bytes(data[:1000]))
    line, _ = _fails(tmp_path, *resume)
    assert line == (f"raylign: CheckpointError: checkpoint {ckpt}: trainer_model.safetensors has 1000 bytes, the "
                    "manifest lists 4096 (truncated or rewritten)")


def test_pair_validation_lists_bad_rows_and_training_refuses_them(tmp_path):
    rows = ['{"prompt": "What is 2+2?", "chosen": "4", "rejected": "4"}',
            '{"prompt": "", "chosen": "a", "rejected": "b"}',
            '{"prompt": "x", "chosen": "a\\nb", "rejected": "c", "scores_chosen": [1.0, 1.0], "scores_rejected": [2.0]}',
            '{"prompt": "ok", "chosen": "yes", "rejected": "no"}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    args = [str(ROOT / "configs/dpo_arith.yaml"), "algorithm.data_path=pairs.jsonl", "algorithm.batch_size=1",
            "model.name=tiny-random-llama"]
    proc = subprocess.run([sys.executable, "-m", "raylign", "data", "validate", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)
    src = tmp_path / "pairs.jsonl"
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [f"{src}:0: rejected: identical to chosen", f"{src}:1: prompt: empty",
                                        f"{src}:2: scores_rejected: 1 score(s) not finite or outside [0, 1], first 2.0",
                                        "3 of 4 pairs invalid (3 problems)"]
    line, _ = _fails(tmp_path, "train", *args)
    assert line == (f"raylign: DataError: 3 invalid rows in the training data, the first: {src}:0: rejected: identical "
                    "to chosen (`raylign data validate CONFIG` lists them all; --skip-invalid drops them)")
    line, _ = _fails(tmp_path, "train", str(ROOT / "configs/dpo_arith.yaml"), "algorithm.data_path=missing.jsonl")
    assert line == f"raylign: DataError: {tmp_path / 'missing.jsonl'}: file not found (algorithm.data_path)"
