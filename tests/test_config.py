"""Config: recipes + overrides, strict keys, clear errors."""

import pytest

from vfmkit.cli import main
from vfmkit.config import ConfigError, load_config


def test_overrides_are_typed():
    cfg = load_config("clip_tiny", ["optim.lr=3e-4", "train.compile=true", "data.batch_size=8"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.compile is True and cfg.data.batch_size == 8
    assert cfg.method == "clip"


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("train.stepz=3", "train.stepz"),
        ("bogus=1", "bogus"),
        ("data.train.x=1", "data.train"),
    ],
)
def test_unknown_or_misplaced_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("clip_tiny", [override])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config({"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config({"optim": {"lr": "fast"}})


def test_override_is_not_evaluated():
    # A Python expression stays a string (yaml.safe_load), so a str field takes it verbatim.
    cfg = load_config({}, ["out_dir=__import__('os').getcwd()"])
    assert cfg.out_dir == "__import__('os').getcwd()"


def test_cli_reports_bad_key_and_bad_path(capsys, tmp_path):
    assert main(["train", "clip_tiny", "--set", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: clip\ndata: {train: " + str(tmp_path / "missing_dir") + "}\ntrain: {steps: 1}\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "missing_dir" in capsys.readouterr().err


def test_method_args_are_strict():
    from vfmkit.methods.clip import parse_args

    with pytest.raises(ConfigError, match=r"method_args\.loss_kind"):
        parse_args(load_config({"method_args": {"loss_kind": "clip"}}))
