"""The config schema: defaults, overrides, and clear errors for bad fields."""
from pathlib import Path

import pytest

from drivers.config import Config, ConfigError, build_config, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert recipes, "configs/ holds no recipe"
    for path in recipes:
        assert isinstance(load_config(path), Config)


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      ["rollout.temperature=0.7", "seed=3", "run.name=x1", "model.path=null"])
    assert cfg.rollout.temperature == 0.7 and cfg.seed == 3 and cfg.run.name == "x1"
    assert cfg.model.path is None
    assert parse_overrides(["a.b.c=1", "a.d=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}}


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError) as e:
        build_config({"rollout": {"temprature": 0.5}})
    assert "rollout.temprature" in str(e.value) and "unknown key" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key"):
        build_config({}, ["learner_rate=1"])


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError) as e:
        build_config({}, ["rollout.group_size=many"])
    msg = str(e.value)
    assert "rollout.group_size" in msg and "'many'" in msg and "integer" in msg


def test_out_of_range_names_field_value_and_bound():
    with pytest.raises(ConfigError) as e:
        build_config({"rollout": {"temperature": -1}})
    msg = str(e.value)
    assert "rollout.temperature" in msg and "-1" in msg and "greater than or equal to 0" in msg
    with pytest.raises(ConfigError) as e:
        build_config({"model": {"dtype": "float8"}})
    assert "model.dtype" in str(e.value) and "'float32'" in str(e.value)


def test_cross_field_check_and_every_error_reported():
    with pytest.raises(ConfigError) as e:
        build_config({"rollout": {"max_tokens": 2000, "max_model_len": 1024}})
    assert "max_tokens (2000)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config({"rollout": {"top_p": 0, "num_workers": 0}})
    assert "rollout.top_p" in str(e.value) and "rollout.num_workers" in str(e.value)
    with pytest.raises(ConfigError, match="task.general_path .* judge.enabled=true and judge.reward_weight > 0"):
        build_config({"task": {"general_path": "general.jsonl"}, "judge": {"enabled": True}})
    assert build_config({"task": {"general_path": "g.jsonl"}, "judge": {"enabled": True, "reward_weight": 0.5}})
    with pytest.raises(ConfigError, match="empty operand range: a 13..12"):
        build_config({"task": {"a_min": 13, "a_max": 12}})
    with pytest.raises(ConfigError, match="empty operand range: a 0..99, b 10..9"):
        build_config({"task": {"b_min": 10, "b_max": 9}})
    with pytest.raises(ConfigError, match="eval_k 4 needs train.eval_temperature > 0"):
        build_config({"train": {"eval_k": 4}})
    with pytest.raises(ConfigError, match="partial_rollouts needs train.mode=async"):
        build_config({"train": {"partial_rollouts": True}})
    assert build_config({"train": {"partial_rollouts": True, "mode": "async"}}).train.partial_rollouts
    with pytest.raises(ConfigError, match="rollout.colocate needs train.mode=sync"):
        build_config({"rollout": {"colocate": True}, "train": {"mode": "async"}})
    with pytest.raises(ConfigError, match="num_workers == learner.num_ranks"):
        build_config({"rollout": {"colocate": True, "num_workers": 2}})
    assert build_config({"rollout": {"colocate": True}}).rollout.colocate


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    for item in ["noequals", "=3", "a..b=1"]:
        with pytest.raises(ConfigError, match="invalid override"):
            parse_overrides([item])
    with pytest.raises(ConfigError, match="not a section"):
        parse_overrides(["seed=1", "seed.x=2"])


def test_cli_reports_config_errors_before_starting_anything(capsys):
    from drivers.cli import main

    assert main(["sample", str(ROOT / "configs/tiny.yaml"), "rollout.temperature=hot"]) == 2
    err = capsys.readouterr().err
    assert "rollout.temperature" in err and "'hot'" in err


def test_reward_section_validates_component_names_and_ranges():
    cfg = build_config({"reward": {"weights": {"accuracy": 1.0, "language": 0.2}}})
    assert cfg.reward.weights == {"accuracy": 1.0, "language": 0.2}
    with pytest.raises(ConfigError) as e:
        build_config({"reward": {"weights": {"acuracy": 1.0}}})
    assert "reward.weights.acuracy" in str(e.value)
    with pytest.raises(ConfigError, match="reward.timeout_s"):
        build_config({}, ["reward.timeout_s=0"])
    with pytest.raises(ConfigError, match="overlong_cache_len"):
        build_config({}, ["reward.overlong_cache_len=1000"])


def _leaf_fields(model, prefix=""):
    """(dotted name, FieldInfo) of every leaf field of the schema, walking the sections."""
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def _nest(dotted, value):
    out = value
    for key in reversed(dotted.split(".")):
        out = {key: out}
    return out


@pytest.mark.parametrize("dotted,info", list(_leaf_fields(Config)), ids=lambda x: x if isinstance(x, str) else "")
def test_every_field_rejects_a_bad_value_and_names_the_field(dotted, info):
    """Generated from the schema itself: no field can be added without a checked error path."""
    import typing

    from annotated_types import Ge, Gt, Le, Lt

    origin = typing.get_origin(info.annotation)
    wrong_type = 42 if origin is dict else {"not": {"a": "value"}}
    with pytest.raises(ConfigError) as e:
        build_config(_nest(dotted, wrong_type))
    assert dotted in str(e.value)
    for bound in info.metadata:           # every numeric bound is enforced and reported
        bad = {Ge: lambda b: b.ge - 1, Gt: lambda b: b.gt, Le: lambda b: b.le + 1, Lt: lambda b: b.lt}.get(type(bound))
        if bad is None:
            continue
        with pytest.raises(ConfigError) as e:
            build_config(_nest(dotted, bad(bound)))
        assert dotted in str(e.value) and "got" in str(e.value)


def test_keep_checkpoints_is_at_least_one():
    assert build_config({}).run.keep_checkpoints == 3
    assert build_config({}, ["run.keep_checkpoints=2"]).run.keep_checkpoints == 2
    with pytest.raises(ConfigError, match=r"run.keep_checkpoints: got 0: Input should be greater than or equal to 1"):
        build_config({}, ["run.keep_checkpoints=0"])


def test_renamed_algo_keys_name_the_new_key():
    with pytest.raises(ConfigError) as e:
        build_config({"algo": {"adv_scale": "none", "ratio_level": "sequence", "eps_low": 5}})
    msg = str(e.value)
    assert "algo.adv_scale: renamed" in msg and "use algo.advantage ('std' -> 'grpo', 'none' -> 'drgrpo')" in msg
    assert "algo.ratio_level: renamed" in msg and "use algo.policy_loss ('token' -> 'ppo_clip'" in msg
    assert "algo.eps_low" in msg                       # the other errors are still all reported
    with pytest.raises(ConfigError, match="algo.adv_scale: renamed"):
        build_config({}, ["algo.adv_scale=std"])


def test_a_correction_needs_the_learners_old_logp():
    for name in ("tis", "mis_token", "mis_sequence"):
        with pytest.raises(ConfigError, match=f"rollout_correction '{name}' needs algo.old_logp 'learner'.*"
                                              "set algo.rollout_correction=none"):
            build_config({}, ["algo.old_logp=rollout", f"algo.rollout_correction={name}"])
    cfg = build_config({}, ["algo.old_logp=rollout", "algo.rollout_correction=none"])
    assert cfg.algo.rollout_correction == "none"
    cfg = build_config({}, ["algo.rollout_correction=mis_sequence", "algo.mis_low=0.2", "algo.mis_high=5"])
    assert (cfg.algo.old_logp, cfg.algo.mis_low, cfg.algo.mis_high) == ("learner", 0.2, 5.0)


def test_kv_block_size_is_one_vllm_accepts():
    """rollout.block_size: None (32 on CPU, vLLM's default on GPU) or a power of two from 8 to 256."""
    assert build_config({}).rollout.block_size is None
    assert build_config({"rollout": {"block_size": 64}}).rollout.block_size == 64
    with pytest.raises(ConfigError) as e:
        build_config({"rollout": {"block_size": 48}})
    assert "rollout.block_size" in str(e.value) and "48" in str(e.value)
