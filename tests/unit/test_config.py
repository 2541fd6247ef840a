"""Config composition: every shipped option composes, and bad input fails in one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kdlib
from kdlib.config import KDConfig, LossImplementation, Mode
from kdlib.config.compose import conf_dir, plugins_in
from kdlib.config.store import register_configs, registry_groups
from kdlib.errors import ConfigError


def _yaml_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(conf_dir()) / group).glob("*.yaml"))


def test_default_config_is_typed():
    cfg = kdlib.compose([])
    assert isinstance(cfg, KDConfig)
    assert cfg.mode is Mode.offpolicy
    assert cfg.loss.name == "kl" and cfg.loss.implementation is LossImplementation.fused
    assert cfg.algorithm.name == "vanilla" and 0 < cfg.algorithm.kd_ratio <= 1
    assert cfg.teacher.model.endswith(".gguf")
    assert cfg.student.model == cfg.teacher.model  # interpolated: the pruned copy of the teacher
    assert cfg.train.epochs == 1 and cfg.launcher.name == "local"


@pytest.mark.parametrize("group", ["teacher", "student", "data"])
def test_every_yaml_option_composes(group):
    options = _yaml_options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        cfg = kdlib.compose([f"{group}={option}"])
        assert isinstance(cfg, KDConfig)


# Options that only make sense together.
COMPANIONS = {
    ("launcher", "ray"): ["transport=ray"], ("transport", "ray"): ["launcher=ray"],
    ("teacher/backend", "served"): ["teacher.signal.kind=topk"],  # it sends top-k only
    # rewards and the reward objectives score rollouts: on-policy, with a reward to weigh
    ("algorithm", "reward_kd"): ["+recipe=onpolicy", "reward=numeric"], ("algorithm", "opd"): ["+recipe=onpolicy"],
    ("reward", "regex"): ["+recipe=onpolicy", "reward.pattern=x"],
    ("reward", "python"): ["+recipe=onpolicy", "reward.fn=kdlib.rewards.builtin:last_number"],
}
# Every option of a group that only makes sense with another setting (rewards score rollouts).
GROUP_COMPANIONS = {"reward": ["+recipe=onpolicy"]}


def test_every_registry_option_composes():
    register_configs()
    for group, (registry, key) in registry_groups().items():
        for name in registry.names():
            cfg = kdlib.compose([f"{group}={name}", *COMPANIONS.get((group, name), GROUP_COMPANIONS.get(group, []))])
            node = cfg
            for part in group.split("/"):
                node = getattr(node, part)
            assert getattr(node, key) == name


def test_transport_follows_the_launcher_unless_set():
    cfg = kdlib.compose(["launcher=ray"])
    assert cfg.transport.name == "ray" and "follows launcher=ray" in cfg.auto_choices["transport"]
    assert kdlib.compose([]).transport.name == "inprocess"
    with pytest.raises(ConfigError, match="transport=inprocess cannot carry"):
        kdlib.compose(["launcher=ray", "transport=inprocess"])
    with pytest.raises(ConfigError, match="transport=ray needs launcher=ray"):
        kdlib.compose(["transport=ray"])
    cfg = kdlib.compose(["+recipe=ray"])
    assert cfg.launcher.name == "ray" and cfg.transport.name == "ray" and cfg.student.num_workers == 2


@pytest.mark.parametrize("recipe", _yaml_options("recipe"))
def test_every_recipe_composes(recipe):
    cfg = kdlib.compose([f"+recipe={recipe}"])
    assert isinstance(cfg, KDConfig)


def test_recipes_set_what_they_promise():
    assert kdlib.compose(["+recipe=generate"]).mode is Mode.generate
    assert kdlib.compose(["+recipe=sft"]).algorithm.name == "sft"
    assert kdlib.compose(["+recipe=quickstart"]).train.max_steps == 5
    fast = kdlib.compose(["+recipe=[onpolicy,fast_rollouts]"])
    assert fast.mode is Mode.onpolicy and fast.rollout.engine.value == "frozen" and fast.rollout.sampler.value == "inverse_cdf"
    xtok = kdlib.compose(["+recipe=cross_tokenizer"])
    assert xtok.algorithm.name == "overlap" and xtok.student.tokenizer == "pkg://kdlib/data/builtin/demo_tokenizer"
    assert kdlib.compose(["+recipe=cross_tokenizer", "algorithm=dskd"]).algorithm.name == "dskd"
    # a recipe composes with group choices and overrides given after it
    cfg = kdlib.compose(["+recipe=offpolicy", "loss=jsd", "loss.beta=0.3", "algorithm.kd_ratio=1.0"])
    assert cfg.loss.name == "jsd" and cfg.loss.beta == 0.3 and cfg.algorithm.kd_ratio == 1.0


def test_group_options_carry_their_own_typed_parameters():
    cfg = kdlib.compose(["loss=jsd", "loss.beta=0.25", "loss.temperature=2.0"])
    assert cfg.loss.beta == 0.25 and cfg.loss.temperature == 2.0
    assert isinstance(cfg.loss.beta, float)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss=nope"], "unknown loss 'nope'; choose one of: "),
        (["algorithm=nope"], "unknown algorithm 'nope'; choose one of: "),
        (["+recipe=nope"], "unknown recipe 'nope'; choose one of: "),
        (["train.max_stepz=3"], "unknown key 'train.max_stepz'; valid keys of train are: epochs, max_steps"),
        (["loss.beta=0.3"], "unknown key 'loss.beta'"),  # kl has no beta
        (["train.max_steps=abc"], "bad value for train.max_steps: "),
        (["data.overlong=cut"], "bad value for data.overlong: "),
        (["train.micro_batch_size=0"], "train.micro_batch_size must be positive"),
        (["loss.name=foo"], "unknown loss 'foo'; choose one of: "),
        (["teacher/backend=vllm"], "unknown teacher/backend 'vllm'; choose one of: hf, served, sglang"),
        (["teacher.backend=sglang"], "teacher.backend is the config group teacher/backend: choose it with teacher/backend=<name>"),
        (["student.num_workers=2"], "needs launcher=ray"),
        (["algorithm.kd_ratio=1.5"], "kd_ratio"),
        (["device=gpu"], "device: expected"),
        (["train.adamw_impl=apex"], "bad value for train.adamw_impl: Invalid value 'apex', expected one of [auto, fused, foreach, for_loop, default]"),
    ],
)
def test_bad_config_fails_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        kdlib.compose(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_name_lists_the_valid_choices():
    with pytest.raises(ConfigError) as info:
        kdlib.compose(["loss=nope"])
    for name in ("kl", "rkl", "jsd", "tvd"):
        assert name in str(info.value)


def test_plugins_parsed_from_overrides():
    assert plugins_in(["plugins=[a.b,c]", "x=1"]) == ["a.b", "c"]
    assert plugins_in(["+plugins=mod"]) == ["mod"]
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_module_xyz'"):
        kdlib.compose(["plugins=[no_such_module_xyz]"])


def test_user_loss_from_a_plugin_module_is_a_typed_option(tmp_path, monkeypatch):
    (tmp_path / "my_kd_plugin.py").write_text(
        "import kdlib\n"
        "@kdlib.register_loss('scaled_kl_plugin')\n"
        "def scaled_kl(student_logits, teacher_logits, *, alpha: float = 0.5):\n"
        "    from kdlib.losses import get\n"
        "    return alpha * get('kl')(student_logits, teacher_logits)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = kdlib.compose(["plugins=[my_kd_plugin]", "loss=scaled_kl_plugin", "loss.alpha=0.2"])
    assert cfg.loss.name == "scaled_kl_plugin" and cfg.loss.alpha == 0.2
    with pytest.raises(ConfigError, match="bad value for loss.alpha"):
        kdlib.compose(["plugins=[my_kd_plugin]", "loss=scaled_kl_plugin", "loss.alpha=high"])


def test_import_kdlib_is_light():
    code = (
        "import sys, kdlib; kdlib.compose; "
        "heavy = [m for m in ('torch', 'ray', 'sglang', 'wandb', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_compose_never_imports_ray_or_sglang():
    code = (
        "import sys, kdlib; kdlib.compose(['loss=jsd']); "
        "print(','.join(m for m in ('ray', 'sglang', 'wandb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _script_commands(path: Path) -> list[list[str]]:
    """The kdlib command lines of a launcher script, with its variables filled in."""
    import shlex

    text = path.read_text().replace("\\\n", " ")
    env = {"DATA": "train.jsonl", "EVAL": "null", "PROMPTS": "prompts.jsonl", "OUT": "answers.jsonl"}
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("kdlib "):
            continue
        for key, value in env.items():
            line = line.replace(f'"${key}"', value).replace(f"${key}", value)
        commands.append([a for a in shlex.split(line)[1:] if a != "$@"])
    return commands


@pytest.mark.parametrize("script", sorted((Path(__file__).parents[2] / "recipes").glob("*.sh")), ids=lambda p: p.name)
def test_launcher_scripts_compose(script):
    commands = _script_commands(script)
    assert commands, f"{script.name} runs no kdlib command"
    for args in commands:
        assert isinstance(kdlib.compose(args), KDConfig)


def test_notebook_is_valid_json_with_code():
    import json

    notebook = json.loads((Path(__file__).parents[2] / "recipes" / "notebook.ipynb").read_text())
    assert any(cell["cell_type"] == "code" and "kdlib.run" in "".join(cell["source"]) for cell in notebook["cells"])
