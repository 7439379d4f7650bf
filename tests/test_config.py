import pytest
import yaml

from gpt2fit.config import builtin_recipes, load_recipe, parse_config
from gpt2fit.errors import UserError


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_shipped_recipe_parses(name):
    cfg, _ = parse_config([name])
    assert cfg.recipe == name
    assert cfg.data.data_dir, "every recipe names its data_dir"
    assert cfg.run.max_steps or cfg.run.max_tokens or cfg.run.epochs, "every recipe has a stopping point"


def test_flags_override_recipe_and_yaml_floats_are_coerced(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 2e-4\nmax_steps: 10\nn_layer: 2\ndata_dir: d\n")
    cfg, _ = parse_config([str(recipe), "--max_steps", "7", "--grad_checkpointing"])
    assert cfg.optim.learning_rate == 2e-4  # PyYAML reads 2e-4 as a string; coerced to float
    assert cfg.run.max_steps == 7 and cfg.model.grad_checkpointing is True
    assert yaml.safe_load(cfg.to_yaml())["learning_rate"] == 2e-4


@pytest.mark.parametrize("argv, message", [
    (["quickstrat"], "unknown recipe 'quickstrat'. Did you mean 'quickstart'?"),
    (["quickstart", "--learning_rat", "1e-3"], "unknown flag --learning_rat. Did you mean 'learning_rate'"),
    (["quickstart", "--max_steps", "ten"], "max_steps='ten' in the command line is not a valid int"),
    (["quickstart", "--max_steps", "0"], "max_steps=0 must be a positive integer"),
    (["quickstart", "--learning_rate", "-1"], "learning_rate=-1.0 must not be negative"),
    (["quickstart", "--optimizer", "adamw9bit"], "optimizer='adamw9bit' in the command line is not one of"),
    (["quickstart", "--micro_batch_size", "big"], "micro_batch_size='big' must be a positive integer or 'auto'"),
    (["quickstart", "--max_tokens", "lots"], "max_tokens"),
])
def test_bad_values_name_the_key(argv, message):
    with pytest.raises(UserError) as e:
        parse_config(argv)
    assert message in str(e.value)


def test_unknown_recipe_key_suggests(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_step: 10\n")
    with pytest.raises(UserError, match=r"unknown key 'max_step' in recipe .* Did you mean 'max_steps'"):
        load_recipe(str(recipe))


def test_help_has_text_for_every_flag(capsys):
    """Every training field's own help text (not the "(default: ...)" the builder appends) is a real
    sentence, and the rendered --help shows every flag with it."""
    from gpt2fit import options
    from gpt2fit.config import FIELDS, SECTIONS, CommandArgs

    parser = options.make_parser("gpt2fit train", [CommandArgs, *SECTIONS], description="")
    text = " ".join(parser.format_help().split())
    for name, (_, fl, _) in FIELDS.items():
        own = fl.metadata.get("help", "")
        assert len(own) > 10 and own.rstrip().endswith((".", ")")), (name, own)
        assert f"--{name}" in text and " ".join(own.split())[:40] in text, name


@pytest.mark.parametrize("command", ["prepare", "train", "sample", "plan", "eval", "plot", "push", "bench",
                                     "recipes"])
def test_every_command_renders_its_help(command, capsys):
    """Render --help for real: argparse %-formats help strings, so a stray '%' crashes only here."""
    from gpt2fit.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gpt2fit " + command), out[:200]
    assert "Traceback" not in out


def test_train_script_help_renders():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "75% less" in " ".join(r.stdout.split())  # the literal '%' survives formatting


def test_a_runs_config_yaml_is_a_recipe(tmp_path):
    """Re-running a run from its saved config: config.yaml (which records `recipe:`) parses back to the
    same settings, positionally or as --config, and flags still win."""
    cfg, _ = parse_config(["quickstart", "--max_steps", "7", "--learning_rate", "2.0e-3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    again, _ = parse_config([str(saved)])
    assert {k: v for k, v in again.to_flat().items() if k != "recipe"} == \
        {k: v for k, v in cfg.to_flat().items() if k != "recipe"}
    flagged, _ = parse_config(["--config", str(saved), "--max_steps", "9"])
    assert flagged.run.max_steps == 9 and flagged.optim.learning_rate == 2.0e-3
    with pytest.raises(UserError, match="two recipes given"):
        parse_config(["quickstart", "--config", str(saved)])
