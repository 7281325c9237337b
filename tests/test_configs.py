"""Every recipe YAML parses with its recipe's TrlParser on the pinned stack, holds the paper's setting, and rejects
unknown keys; CLI flags override YAML keys."""

import os

import pytest
import yaml
from repo_scripts import ROOT, load_script


# The YAMLs hold the GPU setting (bf16); on this CPU-only CI, bf16 needs --use_cpu or TrainingArguments refuses it.
CPU = ["--use_cpu", "true"]
RECIPES = ("commonsense", "metamath", "convai2")
EPOCHS = {"commonsense": 3, "metamath": 2, "convai2": 1}


def recipe_yamls():
    found = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "recipes")):
        found += [os.path.join(dirpath, f) for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


def test_every_recipe_has_its_yaml():
    stems = {os.path.splitext(os.path.basename(p))[0].split(".")[0] for p in recipe_yamls()}
    assert set(RECIPES) <= stems


@pytest.mark.parametrize("path", recipe_yamls(), ids=os.path.basename)
def test_yaml_parses_with_paper_setting(path):
    name = os.path.splitext(os.path.basename(path))[0].split(".")[0]
    recipe = load_script("recipes", name)
    script_args, training_args, model_args, hira_args = recipe.make_parser().parse_args_and_config(["--config", path, *CPU])
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
    assert training_args.report_to in ([], "none", ["none"])
    assert script_args.dataset_name


@pytest.mark.parametrize("name", RECIPES)
def test_default_config_is_injected_and_cli_overrides(name):
    from hira.recipe import with_default_config

    recipe = load_script("recipes", name)
    argv = with_default_config(recipe.__file__, ["--hira_r", "8", "--method", "lora", "--learning_rate", "3e-4", *CPU])
    assert argv[:2] == ["--config", os.path.join(ROOT, "recipes", f"{name}.yaml")]
    _, training_args, _, hira_args = recipe.make_parser().parse_args_and_config(argv)
    assert hira_args.hira_r == 8 and hira_args.method == "lora" and training_args.learning_rate == 3e-4
    # an explicit --config is left alone
    assert with_default_config(recipe.__file__, ["--config", "x.yaml"]) == ["--config", "x.yaml"]


@pytest.mark.parametrize("name", RECIPES)
def test_unknown_yaml_key_is_an_error(name, tmp_path):
    recipe = load_script("recipes", name)
    with open(os.path.join(ROOT, "recipes", f"{name}.yaml")) as f:
        config = yaml.safe_load(f)
    config["hira_rank"] = 8  # a typo of hira_r
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="hira_rank"):
        recipe.make_parser().parse_args_and_config(["--config", str(bad), *CPU])


def test_unknown_cli_flag_is_an_error():
    recipe = load_script("recipes", "commonsense")
    path = os.path.join(ROOT, "recipes", "commonsense.yaml")
    with pytest.raises((ValueError, SystemExit)):
        recipe.make_parser().parse_args_and_config(["--config", path, *CPU, "--lora_rank", "8"])


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
    recipe = load_script("recipes", "commonsense")
    with open(os.path.join(ROOT, "recipes", "commonsense.yaml")) as f:
        config = yaml.safe_load(f)
    config["hira_kwargs"] = {"fused": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    *_, hira_args = recipe.make_parser().parse_args_and_config(["--config", str(path), *CPU])
    assert hira_args.hira_kwargs == {"fused": False}


@pytest.mark.parametrize("value,expected", [("last", True), ("true", True), (None, None), ("false", None)])
def test_resume_sentinels(value, expected):
    from hira.recipe import resolve_resume

    assert resolve_resume(value) is expected


def test_resume_missing_path_is_an_error(tmp_path):
    from hira.recipe import resolve_resume

    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "checkpoint-7"))


@pytest.mark.parametrize("path", sorted(os.listdir(os.path.join(ROOT, "accelerate_configs"))))
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    if not path.endswith(".yaml"):
        pytest.skip("not a config")
    config = load_config_from_file(os.path.join(ROOT, "accelerate_configs", path))
    assert config.num_processes >= 1
