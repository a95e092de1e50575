"""Config: layering, and one clear error for unknown keys, wrong types and impossible values."""

from pathlib import Path

import pytest

from raylign.config import Config, ConfigError, config_fields, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_offline_arith_eval():
    cfg = load_config(environ={})
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.env.name == "arith"
    assert cfg.model.trust_remote_code is False


def test_layers_preset_then_env_then_cli(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("generator:\n  temperature: 0.3\n  max_new_tokens: 32\nname: x\n")
    cfg = load_config(preset, ["generator.temperature=0.7", "dataset.limit=5"],
                      environ={"RAYLIGN_GENERATOR__MAX_NEW_TOKENS": "48", "RAYLIGN_GENERATOR__TEMPERATURE": "0.5"})
    assert cfg.generator.temperature == 0.7  # CLI beats env beats preset
    assert cfg.generator.max_new_tokens == 48
    assert cfg.dataset.limit == 5
    assert cfg.name == "x"


@pytest.mark.parametrize("override, expected", [
    ("generator.temprature=0.5", "unknown key 'generator.temprature'"),
    ("generator.max_new_tokens=lots", "field 'generator.max_new_tokens'"),
    ("generator.top_p=1.5", "field 'generator.top_p'"),
    ("generator.num_replicas=0", "field 'generator.num_replicas'"),
    ("env.name=chess", "field 'env.name'"),
    ("nonsense=1", "unknown key 'nonsense'"),
])
def test_bad_overrides_name_the_field_and_source(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override], environ={})
    message = str(info.value)
    assert expected in message
    assert override in message  # names where the bad value came from
    assert "\n" not in message


def test_bad_preset_names_the_file(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("generator:\n  n: 4\n  temperature: 0.0\n")
    with pytest.raises(ConfigError, match="bad.yaml.*temperature > 0"):
        load_config(preset, environ={})
    preset.write_text("generatr:\n  n: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'generatr'"):
        load_config(preset, environ={})
    preset.write_text("generator: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(preset, environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_bad_env_variable_is_named():
    with pytest.raises(ConfigError, match="RAYLIGN_GENERATOR__N"):
        load_config(None, environ={"RAYLIGN_GENERATOR__N": "-1"})


def test_override_without_equals():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["generator.temperature"], environ={})


def test_every_field_has_a_doc():
    fields = config_fields()
    assert "generator.temperature" in fields and "dataset.question_key" in fields
    assert all(doc.strip() for doc in fields.values()), [k for k, v in fields.items() if not v.strip()]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["generator.temperature=0.9", "generator.n=4"], environ={})
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", environ={})
    assert again == cfg


def test_default_output_dir_uses_name():
    cfg = Config(name="abc")
    assert str(cfg.resolved_output_dir()).startswith("runs/abc-")


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(preset):
    cfg = load_config(preset, environ={})
    assert cfg.name


@pytest.mark.parametrize("overrides, expected", [
    (["algorithm.name=dpo", "algorithm.group_size=4"],
     "override 'algorithm.group_size=4': unknown key 'algorithm.group_size' for algorithm.name=dpo (a field of "
     "grpo, online_dpo, ppo, reinforce, reinforce_pp, restem, rloo, vineppo)"),
    (["algorithm.name=sgd"], "override 'algorithm.name=sgd': field 'algorithm.name': unknown algorithm 'sgd'; "
     "expected one of grpo, rloo, reinforce, reinforce_pp, ppo, vineppo, sft, dpo, online_dpo, step_dpo, restem"),
    (["algorithm.name=dpo", "algorithm.beta=0"],
     "override 'algorithm.beta=0': field 'algorithm.beta': Input should be greater than 0 (got 0)"),
])
def test_each_algorithm_has_its_own_section(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides, environ={})
    assert str(info.value) == expected


def test_algorithm_section_defaults_to_grpo_and_round_trips_by_name(tmp_path):
    cfg = load_config(None, ["algorithm.group_size=3"], environ={})
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.group_size == 3
    dpo = load_config(None, ["algorithm.name=dpo", "algorithm.loss_type=dpop"], environ={})
    assert type(dpo.algorithm).__name__ == "DpoConfig" and dpo.algorithm.items_per_step == dpo.algorithm.batch_size
    dpo.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", environ={}).algorithm == dpo.algorithm
    docs = config_fields()
    assert docs["algorithm.beta"].endswith("[dpo, online_dpo, step_dpo]") and "algorithm.mc_rollouts" in docs


def test_more_minibatches_than_prompts_is_refused():
    with pytest.raises(ConfigError, match=r"algorithm.minibatches \(4\) exceeds algorithm.prompts_per_step \(2\)"):
        load_config(None, ["algorithm.minibatches=4", "algorithm.prompts_per_step=2"], environ={})
