"""Driver-side checks before any actor starts: absolute paths, enough problems, resumable checkpoints."""

import json
from pathlib import Path

import pytest

from raylign import storage
from raylign.config import ConfigError, load_config
from raylign.envs import DataError, make_env
from raylign.orchestrator.checkpoint import save_checkpoint
from raylign.orchestrator.preflight import require_problems, resume_point, training_problems
from raylign.orchestrator.train_loop import checkpoint_every


def test_absolutized_makes_every_local_path_absolute(tmp_path):
    (tmp_path / "models/mine").mkdir(parents=True)
    cfg = load_config(None, ["output_dir=runs/demo", "model.name=models/mine", "dataset.path=data/{split}.jsonl",
                             "trainer.weights_dir=shm", "rag.index_dir=~/idx", "model.cache_dir=cache",
                             "rag.corpus_path=org/hub-corpus"], environ={})
    out = cfg.absolutized(tmp_path)
    assert out.output_dir == str(tmp_path / "runs/demo")
    assert out.model.name == str(tmp_path / "models/mine")
    assert out.dataset.path == str(tmp_path / "data/{split}.jsonl")  # the placeholder survives
    assert out.trainer.weights_dir == str(tmp_path / "shm")
    assert out.rag.index_dir == str(Path("~/idx").expanduser())
    assert out.model.cache_dir == str(tmp_path / "cache")
    assert out.rag.corpus_path == "org/hub-corpus"  # a hub id, nothing on disk: left alone
    assert out.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.output_dir == "runs/demo"  # the original is untouched


def test_absolutized_keeps_builtin_model_names_and_absolute_paths(tmp_path):
    cfg = load_config(None, ["output_dir=/abs/run", "tracking.uri=sqlite:////abs/m.db"], environ={})
    out = cfg.absolutized(tmp_path)
    assert out.model.name == "smollm2-135m-instruct"
    assert out.output_dir == "/abs/run" and out.tracking.uri == "sqlite:////abs/m.db"
    assert load_config(None, [], environ={}).absolutized(tmp_path).output_dir.startswith(str(tmp_path / "runs/raylign-"))


def test_too_few_problems_name_the_source_split_and_field(tmp_path):
    cfg = load_config(None, ["env.num_problems=3", "algorithm.prompts_per_step=8"], environ={})
    with pytest.raises(DataError) as info:
        training_problems(make_env(cfg.env, cfg.dataset), cfg)
    assert str(info.value) == ("env.name=arith (built-in data): split 'train' yields only 3 problems; one training "
                               "step (algorithm.prompts_per_step=8) needs at least 8")
    path = tmp_path / "none.jsonl"
    cfg = load_config(None, [f"dataset.path={path}"], environ={})
    with pytest.raises(DataError, match=f"^{path}: split 'test' yields no problems; an eval needs at least 1$"):
        require_problems([], cfg, "test", 1, "an eval")


def test_eval_limit_zero_only_with_evals_off():
    with pytest.raises(ConfigError, match="train.eval_limit=0 leaves nothing to evaluate but train.eval_before and "
                                          "train.eval_after are on"):
        load_config(None, ["train.eval_limit=0"], environ={})
    cfg = load_config(None, ["train.eval_limit=0", "train.eval_before=false", "train.eval_after=false"], environ={})
    train, evals = training_problems(make_env(cfg.env, cfg.dataset), cfg)
    assert len(train) == 200 and evals == []


def test_checkpoints_often_enough_for_the_allowed_loss():
    assert checkpoint_every(load_config(None, [], environ={})) == 1  # fault.max_lost_steps by default
    assert checkpoint_every(load_config(None, ["train.checkpoint_every=2", "fault.max_lost_steps=4"], environ={})) == 2
    assert checkpoint_every(load_config(None, ["train.checkpoint_every=10", "fault.max_lost_steps=3"], environ={})) == 3
    assert checkpoint_every(load_config(None, ["fault.max_trainer_restarts=0"], environ={})) == 0


def _fake_checkpoint(out_dir: Path, cfg, step: int = 2) -> Path:
    def write_trainer(folder: str) -> dict:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "trainer_model.safetensors").write_bytes(b"weights")
        return storage.file_entries(folder)

    state = {"policy_version": step, "data": {"epoch": 0, "position": 4}, "config": cfg.model_dump(mode="json")}
    return Path(save_checkpoint(out_dir / "checkpoints", step, write_trainer, state, keep=2,
                                meta={"world_size": cfg.trainer.num_workers, "model": cfg.model.name}))


def test_resume_refuses_a_changed_field_and_names_it(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.resume=auto"], environ={}).absolutized()
    ckpt = _fake_checkpoint(tmp_path, cfg)
    found, state = resume_point(cfg)
    assert found == str(ckpt) and state["step"] == 2 and state["policy_version"] == 2
    changed = load_config(None, [f"output_dir={tmp_path}", "train.resume=auto", "algorithm.name=rloo"], environ={}).absolutized()
    with pytest.raises(ConfigError) as info:
        resume_point(changed)
    assert str(info.value) == (f"--resume from {ckpt}: it was written with algorithm.name='grpo', this run has "
                               "algorithm.name='rloo'; put it back or use a new output_dir")
    fewer = cfg.model_copy(deep=True)
    fewer.train.steps = 1
    with pytest.raises(ConfigError, match="at step 2, past train.steps=1"):
        resume_point(fewer)
    assert resume_point(cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": "never"})})) == (None, {})


def test_resume_refuses_a_checkpoint_of_another_worker_count(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.resume=auto"], environ={}).absolutized()
    _fake_checkpoint(tmp_path, cfg)
    other = cfg.model_copy(deep=True)
    other.trainer.num_workers = 1
    with pytest.raises(ValueError, match="num_workers"):
        resume_point(other)


def test_driver_state_is_json(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"], environ={}).absolutized()
    ckpt = _fake_checkpoint(tmp_path, cfg)
    assert json.loads((ckpt / "driver_state.json").read_text())["config"]["model"]["name"] == "smollm2-135m-instruct"


def test_storage_is_checked_before_anything_starts(tmp_path, s3_bucket):
    from raylign.orchestrator.preflight import check_storage

    good = load_config(None, [f"output_dir={tmp_path}", f"train.storage={storage.join(s3_bucket, 'run')}"], environ={})
    check_storage(good.absolutized())  # writes and removes a probe object
    assert storage.list_files(storage.join(s3_bucket, "run")) == []
    missing = s3_bucket.replace("s3://raylign-test", "s3://no-such-bucket")
    bad = load_config(None, [f"output_dir={tmp_path}", f"train.storage={missing}"], environ={})
    with pytest.raises(ConfigError, match=r"train.storage='s3://no-such-bucket\?.*' cannot be written: "):
        check_storage(bad.absolutized())
    relative = load_config(None, [f"output_dir={tmp_path}", "train.storage=ckpts"], environ={}).absolutized(tmp_path)
    assert relative.train.storage == str(tmp_path / "ckpts") and relative.storage_root() == str(tmp_path / "ckpts")
