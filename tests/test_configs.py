"""Every recipe YAML parses with its recipe's TrlParser on the pinned stack, holds the paper's setting, and rejects
unknown keys; CLI flags override YAML keys."""

import os
import re

import pytest
import yaml
from repo_scripts import ROOT, load_script

from hira.recipe import METHODS, parse_args


# The YAMLs hold the GPU setting (bf16); on this CPU-only CI, bf16 needs --use_cpu or TrainingArguments refuses it.
CPU = ["--use_cpu", "true"]
PAPER_RECIPES = ("commonsense", "metamath", "convai2")  # the paper's tasks; forks are checked for parsing only
EPOCHS = {"commonsense": 3, "metamath": 2, "convai2": 1}


def recipe_yamls():
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "recipes")):
        found += [os.path.join(dirpath, f) for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


def script_of(yaml_path):
    """recipes/<name>[.<variant>].yaml -> recipes/<name>.py"""
    return os.path.join(ROOT, "recipes", os.path.basename(yaml_path).split(".")[0] + ".py")


def parse(yaml_path, *argv):
    return parse_args(script_of(yaml_path), ["--config", yaml_path, *CPU, *argv])


def test_every_recipe_has_its_yaml():
    stems = {os.path.basename(p).split(".")[0] for p in recipe_yamls()}
    assert set(PAPER_RECIPES) <= stems
    assert all(os.path.isfile(script_of(p)) for p in recipe_yamls()), "a YAML without its recipe script"


@pytest.mark.parametrize("path", recipe_yamls(), ids=os.path.basename)
def test_yaml_parses(path):
    """Every recipe YAML, forks included: parses with its recipe (unknown keys and typos are errors)."""
    script_args, training_args, model_args, hira_args = parse(path)
    assert script_args.dataset_name and training_args.output_dir and model_args.model_name_or_path
    assert hira_args.method in METHODS


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_yaml_holds_the_paper_setting(name):
    path = os.path.join(ROOT, "recipes", f"{name}.yaml")
    script_args, training_args, model_args, hira_args = parse(path)
    assert hira_args.method == "hira"
    assert hira_args.hira_r in (16, 32)
    assert hira_args.hira_target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert hira_args.val_size == 120 and hira_args.train_on_inputs is False
    assert training_args.num_train_epochs == EPOCHS[name]
    assert training_args.weight_decay == 0.0 and training_args.warmup_steps == 100
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 32
    assert training_args.eval_steps == 80 and training_args.save_steps == 80
    assert training_args.load_best_model_at_end and training_args.metric_for_best_model == "eval_loss"
    assert training_args.learning_rate == 1e-3
    assert training_args.optim == "adamw_torch"
    assert model_args.model_name_or_path.startswith("meta-llama/")
    assert model_args.lora_alpha == 2 * hira_args.hira_r  # LLM-Adapters' alpha = 2r for the LoRA/DoRA baselines
    assert training_args.report_to in ([], "none", ["none"])
    assert script_args.dataset_name


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_default_config_is_injected_and_cli_overrides(name):
    script = os.path.join(ROOT, "recipes", f"{name}.py")
    _, training_args, _, hira_args = parse_args(script, ["--hira_r", "8", "--method", "lora", "--learning_rate",
                                                         "3e-4", *CPU])
    assert hira_args.hira_r == 8 and hira_args.method == "lora" and training_args.learning_rate == 3e-4
    assert training_args.num_train_epochs == EPOCHS[name]  # the rest comes from recipes/<name>.yaml


@pytest.mark.parametrize("form", ["--config PATH", "--config=PATH"])
def test_config_flag_in_both_forms(form, tmp_path):
    with open(os.path.join(ROOT, "recipes", "commonsense.yaml")) as f:
        config = yaml.safe_load(f)
    config["num_train_epochs"] = 7
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = form.replace("PATH", str(path)).split(" ") + CPU
    _, training_args, _, _ = parse_args(os.path.join(ROOT, "recipes", "commonsense.py"), argv)
    assert training_args.num_train_epochs == 7
    with pytest.raises(FileNotFoundError, match="no such YAML file"):
        parse_args(os.path.join(ROOT, "recipes", "commonsense.py"), ["--config=" + str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_unknown_yaml_key_is_an_error(name, tmp_path):
    with open(os.path.join(ROOT, "recipes", f"{name}.yaml")) as f:
        config = yaml.safe_load(f)
    config["hira_rank"] = 8  # a typo of hira_r
    bad = tmp_path / f"{name}.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="hira_rank"):
        parse_args(os.path.join(ROOT, "recipes", f"{name}.py"), ["--config", str(bad), *CPU])


def test_trl_env_block_in_the_yaml_is_accepted(tmp_path, monkeypatch):
    """TRL's own `env:` block (docs/recipes.md: WANDB_PROJECT) is not a dataclass field: it is set, not refused."""
    monkeypatch.delenv("HIRA_TEST_ENV_BLOCK", raising=False)
    with open(os.path.join(ROOT, "recipes", "commonsense.yaml")) as f:
        config = yaml.safe_load(f)
    config["env"] = {"HIRA_TEST_ENV_BLOCK": "set-by-trl"}
    path = tmp_path / "with_env.yaml"
    path.write_text(yaml.safe_dump(config))
    parse_args(os.path.join(ROOT, "recipes", "commonsense.py"), ["--config", str(path), *CPU])
    assert os.environ["HIRA_TEST_ENV_BLOCK"] == "set-by-trl"


@pytest.mark.parametrize("flag", ["--lora_rank", "--learning_rat", "--hira_tar"])
def test_unknown_or_abbreviated_cli_flag_is_an_error(flag):
    """argparse would take `--learning_rat 0.5` for --learning_rate and `--hira_tar` for --hira_target_modules."""
    recipe = load_script("recipes", "commonsense")
    with pytest.raises(ValueError, match=flag.lstrip("-")) as err:
        recipe.main([*CPU, flag, "0.5"])
    if flag == "--learning_rat":  # the closest real flag is named, before any dataclass validates anything
        assert "did you mean --learning_rate?" in str(err.value)


def test_a_typo_is_reported_before_settings_that_need_it_fixed():
    """On a CPU without --use_cpu the YAML's bf16 would be refused first; the typo must be what the user reads."""
    recipe = load_script("recipes", "commonsense")
    with pytest.raises(ValueError, match="unknown flag --learning_rat"):
        recipe.main(["--learning_rat", "0.5"])


@pytest.mark.parametrize(
    "flag,value,fix",
    [("lora_r", "8", "--hira_r"), ("lora_target_modules", "q_proj", "--hira_target_modules"),
     ("use_dora", "true", "--method dora"), ("use_peft", "true", "--method")],
)
@pytest.mark.parametrize("where", ["cli", "yaml"])
def test_trl_lora_flags_are_refused_with_the_right_flag(flag, value, fix, where, tmp_path):
    recipe = load_script("recipes", "commonsense")
    if where == "cli":
        argv = [*CPU, f"--{flag}", value]
    else:
        with open(os.path.join(ROOT, "recipes", "commonsense.yaml")) as f:
            config = yaml.safe_load(f)
        config[flag] = yaml.safe_load(value)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        argv = ["--config", str(tmp_path / "c.yaml"), *CPU]
    with pytest.raises(ValueError, match=f"{flag} is TRL's LoRA option.*use {re.escape(fix)}"):
        recipe.main(argv)


def test_lora_alpha_follows_the_rank_unless_set(tmp_path):
    from hira.recipe import build_peft_config

    script = os.path.join(ROOT, "recipes", "commonsense.py")
    _, _, model_args, hira_args = parse_args(script, [*CPU, "--method", "lora", "--hira_r", "16"])
    assert model_args.lora_alpha == 32 and build_peft_config(hira_args, model_args).lora_alpha == 32
    _, _, model_args, _ = parse_args(script, [*CPU, "--hira_r", "16", "--lora_alpha", "8"])
    assert model_args.lora_alpha == 8
    with open(os.path.join(ROOT, "recipes", "commonsense.yaml")) as f:
        config = yaml.safe_load(f)
    config["lora_alpha"] = 5
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    _, _, model_args, _ = parse_args(script, ["--config", str(tmp_path / "c.yaml"), *CPU, "--hira_r", "16"])
    assert model_args.lora_alpha == 5


def test_method_and_option_validation():
    from hira.recipe import HiraArguments

    with pytest.raises(ValueError, match="Unknown method"):
        HiraArguments(method="qlora")
    with pytest.raises(ValueError, match="overlength"):
        HiraArguments(overlength="truncate")
    with pytest.raises(ValueError, match="needs method=hira"):
        HiraArguments(method="lora", hira_variant="hilora")
    with pytest.raises(ValueError, match="JSON"):
        HiraArguments(hira_kwargs="{not json")
    assert HiraArguments(hira_kwargs='{"fused": false}').hira_kwargs == {"fused": False}


def test_hira_kwargs_pass_through_to_the_config():
    from hira.recipe import HiraArguments, build_peft_config

    config = build_peft_config(HiraArguments(hira_r=8, hira_kwargs={"fused": False}))
    assert config.r == 8 and config.fused is False and config.peft_type is not None
    with pytest.raises(ValueError, match="no field"):
        build_peft_config(HiraArguments(hira_kwargs={"not_a_field": 1}))


def test_yaml_mapping_for_hira_kwargs(tmp_path):
    with open(os.path.join(ROOT, "recipes", "commonsense.yaml")) as f:
        config = yaml.safe_load(f)
    config["hira_kwargs"] = {"fused": False}
    path = tmp_path / "commonsense.yaml"
    path.write_text(yaml.safe_dump(config))
    *_, hira_args = parse(str(path))
    assert hira_args.hira_kwargs == {"fused": False}


@pytest.mark.parametrize("path", sorted(os.listdir(os.path.join(ROOT, "accelerate_configs"))))
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    if not path.endswith(".yaml"):
        pytest.skip("not a config")
    config = load_config_from_file(os.path.join(ROOT, "accelerate_configs", path))
    assert config.num_processes >= 1


def test_multi_node_commands_parse():
    """Every `accelerate launch` of docs/recipes.md's multi-node section parses with accelerate's launch parser and
    names a config and a recipe that exist (the commands themselves need several machines)."""
    import shlex

    from accelerate.commands.launch import launch_command_parser

    with open(os.path.join(ROOT, "docs", "recipes.md")) as f:
        section = f.read().split("## Multi-node", 1)[1].split("\n## ", 1)[0]
    text = "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S)).replace("\\\n", " ")
    commands = re.findall(r"accelerate launch ([^'\n]*)", text)
    assert len(commands) == 2
    for command in commands:
        command = re.sub(r"\$\(\(.*?\)\)", "16", command)
        command = re.sub(r"\$\w+", "1", command)
        args = launch_command_parser().parse_args(shlex.split(command))
        assert os.path.isfile(os.path.join(ROOT, args.config_file))
        assert os.path.isfile(os.path.join(ROOT, args.training_script))
        assert args.num_machines in (1, 2)  # $SLURM_NNODES is replaced by 1 here
        assert args.num_processes == 16 and args.main_process_port == 29500
