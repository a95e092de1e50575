"""Checkpoint files without Ray: the trainer's state as safetensors + JSON (exact round trip of a fused AdamW,
LambdaLR and RNG states), the trainer-side header checks, and the manifest that makes a folder complete."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

import raylign.actors.trainer_checkpoint as tc
import raylign.orchestrator.checkpoint as oc
from raylign import storage
from raylign.actors.trainable import Trainable
from raylign.orchestrator.checkpoint import (CheckpointError, checkpoint_meta, latest_checkpoint,
                                             read_driver_state, save_checkpoint, verify_checkpoint)


def build(seed: int = 0):
    """A tiny model with the worker's optimizer setup: fused AdamW, two groups (one own lr), LambdaLR."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 3e-2}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer.zero_grad()
    model(torch.randn(6, 4, generator=gen)).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()


def wrapped(model, optimizer=None) -> Trainable:
    return Trainable(model=model, inner=model, optimizer=optimizer, scheduler=None)


@pytest.fixture
def trained():
    model, optimizer, scheduler = build()
    for seed in range(2):
        train_step(model, optimizer, scheduler, seed)
    return model, optimizer, scheduler


def read_optimizer(folder: Path) -> dict:
    _, metas = tc.check_trainer_checkpoint(folder)
    return tc.optimizer_from_files(load_file(folder / tc.POLICY_FILES.optimizer), metas[tc.POLICY_FILES.model])


def restore(folder: Path, scheduler_state: dict):
    """A fresh model/optimizer/scheduler loaded from the files, in the order the worker loads them."""
    model, optimizer, scheduler = build(seed=1)  # other initial weights: the load must overwrite them
    model.load_state_dict(load_file(folder / tc.POLICY_FILES.model))
    set_optimizer_state_dict(model, optimizer, read_optimizer(folder), options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(scheduler_state)
    return model, optimizer, scheduler


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name, entry in want.items():
        assert entry.keys() == got[name].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in entry.items():
            other = got[name][key]
            assert other.dtype == value.dtype and other.shape == value.shape and torch.equal(other, value), (name, key)


def write_trainer(folder: Path, model, optimizer, scheduler) -> dict:
    tc.write_part(folder, tc.POLICY_FILES, wrapped(model).gather_state(),
                  wrapped(model, optimizer).gather_optimizer())
    state = {"format_version": tc.FORMAT_VERSION, "steps": 2, "scheduler": scheduler.state_dict(),
             "rng": [tc.rng_to_json(tc.rng_state())]}
    (folder / tc.STATE_FILE).write_text(json.dumps(state))
    return json.loads((folder / tc.STATE_FILE).read_text())


def test_optimizer_state_round_trips_bit_exactly_and_the_next_step_matches(trained, tmp_path):
    model, optimizer, scheduler = trained
    original = wrapped(model, optimizer).gather_optimizer()
    state = write_trainer(tmp_path, model, optimizer, scheduler)
    model2, optimizer2, scheduler2 = restore(tmp_path, state["scheduler"])

    loaded = read_optimizer(tmp_path)
    assert loaded["param_groups"] == original["param_groups"]  # hyper-parameters, betas a tuple again
    assert_same_tensors(loaded["state"], original["state"])
    assert_same_tensors(wrapped(model2, optimizer2).gather_optimizer()["state"], original["state"])
    assert original["state"]["0.weight"]["step"].dtype == torch.float32  # fused AdamW: fp32 scalar steps
    assert original["state"]["0.weight"]["step"].shape == () and original["state"]["0.weight"]["step"].item() == 2

    train_step(model, optimizer, scheduler, seed=7)
    train_step(model2, optimizer2, scheduler2, seed=7)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    before = load_file(tmp_path / tc.POLICY_FILES.model)
    for (name, p), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, p2) and not torch.equal(p, before[name]), name


def test_scheduler_state_survives_json_exactly(trained):
    state = trained[2].state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["last_epoch"] == 2 and state["lr_lambdas"] == [None, None]


def test_rng_states_round_trip_through_json():
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leaves a cached gaussian in both, part of the state
    saved = json.loads(json.dumps(tc.rng_to_json(tc.rng_state())))
    draws = (torch.rand(5), [random.gauss(0, 1) for _ in range(3)], np.random.standard_normal(3))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    tc.set_rng_state(tc.rng_from_json(saved))
    again = (torch.rand(5), [random.gauss(0, 1) for _ in range(3)], np.random.standard_normal(3))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and np.array_equal(draws[2], again[2])
    assert saved["numpy"]["has_gauss"] == 1 and saved["python"][2] is not None


def test_trainer_check_names_a_broken_file(trained, tmp_path):
    write_trainer(tmp_path, *trained)
    state, metas = tc.check_trainer_checkpoint(tmp_path)
    assert state["steps"] == 2 and tc.POLICY_FILES.model in metas
    model_file = tmp_path / tc.POLICY_FILES.model
    data = model_file.read_bytes()
    model_file.write_bytes(data[:8] + b"#" + data[9:])  # the header's JSON starts at byte 8
    with pytest.raises(ValueError, match=f"{model_file} is not a readable safetensors file"):
        tc.check_trainer_checkpoint(tmp_path)
    model_file.write_bytes(data)
    (tmp_path / tc.STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{tmp_path / tc.STATE_FILE} is not readable JSON"):
        tc.check_trainer_checkpoint(tmp_path)


def test_trainer_check_refuses_an_optimizer_json_that_refers_to_absent_tensors(trained, tmp_path):
    write_trainer(tmp_path, *trained)
    optim = tmp_path / tc.POLICY_FILES.optimizer
    save_file({k: v for k, v in load_file(optim).items() if k != "state.0.bias.exp_avg"}, optim)
    with pytest.raises(ValueError, match=f"{optim} lacks 1 tensor.*state.0.bias.exp_avg"):
        tc.check_trainer_checkpoint(tmp_path)
    (tmp_path / tc.POLICY_FILES.optimizer_meta).write_text(json.dumps({"format_version": 1, "state": []}))
    with pytest.raises(ValueError, match="trainer_optimizer.json does not have the layout"):
        tc.check_trainer_checkpoint(tmp_path)


def test_trainer_check_covers_a_separate_critic(trained, tmp_path):
    model, optimizer, scheduler = trained
    state = write_trainer(tmp_path, model, optimizer, scheduler)
    (tmp_path / tc.STATE_FILE).write_text(json.dumps({**state, "critic_scheduler": scheduler.state_dict()}))
    with pytest.raises(ValueError, match=f"{tmp_path / tc.CRITIC_FILES.model} is missing"):
        tc.check_trainer_checkpoint(tmp_path)
    tc.write_part(tmp_path, tc.CRITIC_FILES, wrapped(model).gather_state(),
                  wrapped(model, optimizer).gather_optimizer())
    _, metas = tc.check_trainer_checkpoint(tmp_path)
    assert metas.keys() == {tc.POLICY_FILES.model, tc.CRITIC_FILES.model}


def test_trainer_check_names_older_pt_checkpoints(tmp_path):
    (tmp_path / "trainer_state.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="older raylign"):
        tc.check_trainer_checkpoint(tmp_path)


def test_no_code_runs_on_load():
    for module in (tc, oc):
        source = Path(module.__file__).read_text()
        assert "torch.load" not in source and "pickle" not in source and "weights_only" not in source


# --- manifest --------------------------------------------------------------------------------------------

META = {"world_size": 2, "model": "smollm2-135m-instruct"}


def fake_trainer(folder: str) -> dict:
    """What trainer rank 0 does: write on its own disk, publish to the location, report sizes and hashes."""
    with storage.staged(folder) as local:
        save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(Path(local) / "trainer_model.safetensors"))
        (Path(local) / "trainer_state.json").write_text(json.dumps({"steps": 3}))
        return storage.file_entries(local)


def save(root, step: int, keep: int = 5) -> Path:
    return Path(save_checkpoint(root, step, fake_trainer, {"policy_version": step}, keep=keep, meta=META))


def test_a_complete_checkpoint_is_listed_and_verifies(tmp_path):
    ckpt = save(tmp_path, 16)
    assert latest_checkpoint(tmp_path) == str(ckpt) == str(tmp_path / "step-000016")
    manifest = verify_checkpoint(ckpt, expect=META)
    assert set(manifest["files"]) == {"trainer_model.safetensors", "trainer_state.json", "driver_state.json"}
    assert manifest["files"]["trainer_model.safetensors"]["bytes"] == (ckpt / "trainer_model.safetensors").stat().st_size
    assert checkpoint_meta(ckpt) == {**META, "step": 16}
    assert read_driver_state(ckpt) == {"policy_version": 16, "step": 16}


def test_checkpoints_in_s3_list_verify_prune_and_refuse_damage(s3_bucket):
    """The same checkpoint code on an S3 endpoint (moto's server speaks the S3 protocol; pyarrow's S3 client)."""
    root = storage.join(s3_bucket, "run-a", "checkpoints")
    assert latest_checkpoint(root) is None
    for step in (2, 4, 6):
        save_checkpoint(root, step, fake_trainer, {"policy_version": step}, keep=2, meta=META)
    ckpt = storage.join(root, "step-000006")
    assert storage.list_dirs(root) == ["step-000004", "step-000006"]
    assert latest_checkpoint(root) == ckpt and read_driver_state(ckpt) == {"policy_version": 6, "step": 6}
    assert verify_checkpoint(ckpt, expect=META)["meta"]["step"] == 6
    with storage.fetched(ckpt) as local:  # what trainer rank 0 loads from
        assert load_file(Path(local) / "trainer_model.safetensors")["w"].tolist() == list(range(1000))
    storage.write_text(storage.join(ckpt, "trainer_state.json"), "{}")  # rewritten: another size
    assert latest_checkpoint(root) == storage.join(root, "step-000004")
    with pytest.raises(CheckpointError, match="trainer_state.json has 2 bytes, the manifest lists 12"):
        verify_checkpoint(ckpt)
    storage.delete_file(storage.join(ckpt, "manifest.json"))  # an interrupted write: no manifest, never picked
    assert latest_checkpoint(root) == storage.join(root, "step-000004")


def test_a_remote_checkpoint_leaves_its_large_files_for_rank_0_to_hash(s3_bucket, tmp_path, monkeypatch):
    """The driver hashes a remote checkpoint's small files only; the large ones (here: over 1000 bytes) are hashed by
    trainer rank 0 on the copy it fetches, so altered weights still fail the load, naming the file."""
    monkeypatch.setattr(oc, "HASH_ON_DRIVER_BYTES", 1000)
    local = save(tmp_path, 2)
    assert oc.trainer_hashes(local) == {}  # a local checkpoint: the driver hashed it whole
    root = storage.join(s3_bucket, "run-b", "checkpoints")
    ckpt = save_checkpoint(root, 2, fake_trainer, {"policy_version": 2}, keep=2, meta=META)
    model = storage.join(ckpt, "trainer_model.safetensors")
    want = verify_checkpoint(ckpt, expect=META)["files"]["trainer_model.safetensors"]["sha256"]
    assert oc.trainer_hashes(ckpt) == {"trainer_model.safetensors": want}
    with storage.fetched(ckpt) as copy:
        tc._check_hashes(Path(copy), ckpt, oc.trainer_hashes(ckpt))  # the right digests: no error
    data = bytearray(storage.read_bytes(model))
    data[-7] ^= 0x01
    fs, path = storage.open_fs(model)
    with fs.open_output_stream(path) as f:
        f.write(bytes(data))
    assert verify_checkpoint(ckpt, expect=META)["meta"]["step"] == 2  # same size, not hashed by the driver
    with storage.fetched(ckpt) as copy:
        state, metas = tc._checked_on_rank0(Path(copy), ckpt, oc.trainer_hashes(ckpt))
    assert (state, metas) == (f"checkpoint {ckpt}: trainer_model.safetensors does not match its sha256 in the "
                              "manifest (altered or corrupted)", {})
    monkeypatch.setattr(oc, "HASH_ON_DRIVER_BYTES", 16 << 20)  # the default: this small file is the driver's
    with pytest.raises(CheckpointError, match="trainer_model.safetensors does not match its sha256"):
        verify_checkpoint(ckpt)


def test_keep_prunes_only_complete_older_checkpoints(tmp_path):
    legacy = tmp_path / "step-000001"
    legacy.mkdir()
    (legacy / "driver_state.json").write_text("{}")
    for step in (2, 4, 6):
        save(tmp_path, step, keep=2)
    assert storage.list_dirs(tmp_path) == ["step-000001", "step-000004", "step-000006"]


def test_a_folder_without_manifest_is_not_a_checkpoint(tmp_path):
    ckpt = save(tmp_path, 4)
    (ckpt / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match=r"no manifest.json \(written by an older raylign or incomplete\)"):
        verify_checkpoint(ckpt)


def test_a_truncated_file_is_skipped_and_refused(tmp_path):
    older, ckpt = save(tmp_path, 2), save(tmp_path, 4)
    path = ckpt / "trainer_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert latest_checkpoint(tmp_path) == str(older)
    with pytest.raises(CheckpointError, match=r"trainer_model.safetensors has \d+ bytes, the manifest lists \d+"):
        verify_checkpoint(ckpt)


def test_a_flipped_byte_fails_the_hash(tmp_path):
    ckpt = save(tmp_path, 4)
    path = ckpt / "trainer_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path) == str(ckpt)  # same size: only hashing finds it
    with pytest.raises(CheckpointError, match="trainer_model.safetensors does not match its sha256"):
        verify_checkpoint(ckpt)


def test_a_missing_file_is_named(tmp_path):
    ckpt = save(tmp_path, 4)
    (ckpt / "driver_state.json").unlink()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="driver_state.json is missing"):
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("text, message", [("{", "manifest.json is not valid JSON"),
                                           ('{"format_version": 7, "meta": {}, "files": {}}',
                                            "manifest.json has format version 7; this raylign reads version 1"),
                                           ('{"format_version": 1, "meta": {}, "files": {"../x": {"bytes": 1}}}',
                                            "manifest.json has a malformed entry for ../x")])
def test_a_broken_manifest_is_named(tmp_path, text, message):
    ckpt = save(tmp_path, 4)
    (ckpt / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(ckpt)


def test_an_expectation_mismatch_names_the_field(tmp_path):
    ckpt = save(tmp_path, 16)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(ckpt, expect={"world_size": 1})
    assert str(err.value) == (f"checkpoint {ckpt} was written by 2 trainer workers (trainer.num_workers=2); "
                              f"this run has trainer.num_workers=1")
    with pytest.raises(CheckpointError, match="written with model.name='smollm2-135m-instruct'; this run has "
                                              "model.name='tiny-random-llama'"):
        verify_checkpoint(ckpt, expect={"model": "tiny-random-llama"})
    with pytest.raises(CheckpointError, match="does not record seed"):
        verify_checkpoint(ckpt, expect={"seed": 1})
