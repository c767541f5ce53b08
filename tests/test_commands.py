"""The `octlightning` entry point: the eight commands, null at any depth, data -> model links."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from octlightning.cli import run_cli
from octlightning.commands import COMMANDS, main, null_means_none
from tests.conftest import CPU_TRAINER, REPO, TINY_VESSEL
from tests.fixtures.isic import write_isic_layout
from tests.fixtures.mirage import write_mirage_layout
from tests.fixtures.oct_layers import write_oct_h5

FOUNDATION = str(REPO / "hparams" / "duke_dme_foundation.json")
VESSEL = str(REPO / "hparams" / "vessel_unet.json")
ISIC = str(REPO / "hparams" / "isic_deeplabv3plus.json")
OCT_UNET = str(REPO / "hparams" / "oct_unet.json")
IMAGE_SIZE = "--data.init_args.image_size must be an int or [height, width] >= 1, got"


def _octlightning(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "octlightning", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_help_lists_the_eight_commands_and_each_has_its_own_help():
    out = _octlightning("--help")
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["fit", "validate", "test", "predict", "check-data", "sweep", "evaluate", "convert"]
    assert list(COMMANDS) == listed
    for command in listed:
        sub = _octlightning(command, "--help")
        assert sub.returncode == 0, f"{command} --help: {sub.stderr[-2000:]}"
        assert "usage" in sub.stdout.lower(), command
    unknown = _octlightning("train")
    assert unknown.returncode == 2 and "unknown command 'train'" in unknown.stderr


def test_null_is_none_at_any_depth_of_the_command_line(capsys):
    key = "--model.init_args.net.init_args.weights"
    assert null_means_none([key, "null", "--trainer.max_epochs", "3"]) == [
        "--model.init_args.net", '{"init_args": {"weights": null}}', "--trainer.max_epochs", "3"
    ]  # fmt: skip
    assert null_means_none([f"{key}=null"]) == ["--model.init_args.net", '{"init_args": {"weights": null}}']
    # one level deep jsonargparse reads null itself; other values pass unchanged
    assert null_means_none(["--model.init_args.sliding_window", "null", key, "w.pth"]) == [
        "--model.init_args.sliding_window", "null", key, "w.pth"
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        run_cli(null_means_none(["fit", "--config", FOUNDATION, key, "null", "--print_config"]))
    printed = capsys.readouterr().out
    assert "weights: null" in printed and "weights: None" not in printed


FOUNDATION_TINY = [
    "--model.init_args.net.init_args.preset", "tiny",
    "--model.init_args.net.init_args.weights", "null",
    "--model.init_args.net.init_args.mode", "finetune",
    "--model.init_args.net.init_args.decoder_channels", "8",
    "--model.init_args.net.init_args.decoder_depth", "1",
    "--data.init_args.num_workers", "0",
    "--data.init_args.batch_size", "2",
    "--trainer.fast_dev_run", "true",
    *CPU_TRAINER,
]  # fmt: skip


def test_class_count_and_names_come_from_the_data(tmp_path):
    """A 4-class MIRAGE dataset on the foundation recipe gives a 4-class model named after INFO.json."""
    root = write_mirage_layout(tmp_path / "four", ["Background", "Retina", "Choroid", "Fluid"], [0, 80, 160, 255])
    args = ["--config", FOUNDATION, "--data.init_args.root", str(root), *FOUNDATION_TINY]
    cli = run_cli(null_means_none(["fit", *args, "--trainer.default_root_dir", str(tmp_path / "runs")]))
    image = cli.datamodule.val_set[0]["image"][None]
    assert cli.model.num_classes == 4 and cli.model.net(image).shape[1] == 4
    assert cli.model.class_names == ["Retina", "Choroid", "Fluid"]
    logged = set(cli.trainer.logged_metrics)
    assert "val/dice_Fluid" in logged and not any(k.endswith("_OPL") for k in logged)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "hparams").glob("*.json")))
def test_fit_with_a_wrong_root_stops_naming_the_path_and_the_option(recipe, tmp_path):
    runs = tmp_path / "runs"
    out = _octlightning("fit", "--config", str(REPO / "hparams" / recipe), "--data.init_args.root",
                        "no/such/dataset", "--trainer.default_root_dir", str(runs))  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("octlightning: data error: no/such/dataset (= /"), message
    assert "not found" in message and "set --data.init_args.root" in message, message
    assert not runs.exists()


def test_the_foundation_recipe_without_its_weights_file_stops_with_one_line_naming_the_fix(tmp_path):
    """The recipe names pretrained/mirage_base.pth, a file only the user has: jsonargparse wrapped the
    missing file in a 95-line "Does not validate against any of the Union subtypes" traceback."""
    root = write_mirage_layout(tmp_path / "four", ["Background", "Retina", "Choroid", "Fluid"], [0, 80, 160, 255])
    runs = tmp_path / "runs"
    out = _octlightning("fit", "--config", FOUNDATION, "--data.init_args.root", str(root),
                        "--trainer.default_root_dir", str(runs))  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("octlightning: config error: weights file not found: pretrained/mirage_base.pth (= /")
    assert "--model.init_args.net.init_args.weights" in message and "mode finetune" in message, message
    assert not runs.exists()


def test_a_config_that_contradicts_the_data_fails_before_training_naming_both_values(tmp_path, drive_root):
    runs = tmp_path / "runs"
    out = _octlightning(
        "fit", "--config", VESSEL, "--data.init_args.root", str(drive_root), *TINY_VESSEL,
        "--model.init_args.net.init_args.num_classes", "3", "--trainer.default_root_dir", str(runs),
    )  # fmt: skip
    assert out.returncode == 1
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("octlightning: config error: model.init_args.net.init_args.num_classes is 3")
    assert "num_classes = 1" in message
    assert not runs.exists()  # nothing was built: no run folder


def test_a_loss_module_with_its_own_settings_comes_from_the_config(tmp_path, drive_root):
    loss = {"class_path": "octlightning.losses.DiceLoss", "init_args": {"smooth": 0.25}}
    cli = run_cli(
        ["fit", "--config", VESSEL, "--data.init_args.root", str(drive_root), *TINY_VESSEL,
         "--model.init_args.loss", json.dumps(loss), "--trainer.fast_dev_run", "true",
         "--trainer.default_root_dir", str(tmp_path / "runs")]
    )  # fmt: skip
    assert type(cli.model.loss_fn).__name__ == "DiceLoss" and cli.model.loss_fn.smooth == 0.25
    # every fit checks that the network beats a constant prediction, whatever the recipe lists
    assert sum(type(c).__name__ == "BeatConstantBaseline" for c in cli.trainer.callbacks) == 1


def _one_line_error(argv: list[str], capsys) -> str:
    """The last stderr line of ``octlightning ARGV``, which must exit 1 without a traceback."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_a_weights_file_of_another_network_stops_with_one_line_naming_the_option(tmp_path, capsys):
    # a local encoder file that does not fit the encoder ended fit in a traceback
    root = write_isic_layout(tmp_path / "isic")
    other = tmp_path / "vit_b16.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, other)
    line = _one_line_error(["fit", "--config", ISIC, "--data.init_args.root", str(root), "--comet", "false",
                            "--trainer.default_root_dir", str(tmp_path / "runs"),
                            "--model.init_args.net.init_args.encoder_weights", str(other)], capsys)  # fmt: skip
    assert line.startswith(f"octlightning: config error: --model.init_args.net.init_args.encoder_weights {other}: ")
    assert "no key matches the ResNetEncoder encoder" in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("recipe", "option", "value", "answer"),
    [
        ("isic", "--data.init_args.mask_pattern", "{name}_mask.png",
         "--data.init_args.mask_pattern '{name}_mask.png' must contain {stem}"),
        ("isic", "--data.init_args.image_size", "[0, 256]", IMAGE_SIZE),
        ("oct", "--data.init_args.image_size", "[256, 256, 3]", IMAGE_SIZE),
        ("oct", "--model.init_args.thickness_between", "[1, -1]",
         "--model.init_args.thickness_between [1, -1] names one boundary twice"),
        # these two stopped at the first batch, after the run folder was made
        ("oct", "--model.init_args.mc_samples", "4", "--model.init_args.mc_samples > 0 needs dropout in the network"),
        ("oct_segformer", "--model.init_args.net.init_args.head", "pool",
         "--model.init_args.loss ce_l1 needs the row logits of the soft_argmax head"),
        # read as a count of 1 and trained without a word (a new user's trial)
        ("oct", "--data.init_args.val_fraction", "1.5",
         "--data.init_args.val_fraction 1.5: below 1 a fraction, else a whole count"),
        # Lightning's MisconfigurationException: a trainer option it refuses
        ("isic", "--trainer.max_time", "1 minute", "`Timer(duration='1 minute')` is not a valid duration"),
    ],
)  # fmt: skip
def test_an_option_a_class_refuses_stops_with_one_line_naming_it(recipe, option, value, answer, tmp_path, capsys):
    # each of these ended in a traceback from the class's constructor
    if recipe == "isic":
        config, root = ISIC, write_isic_layout(tmp_path / "isic")
    else:
        config = OCT_UNET if recipe == "oct" else str(REPO / "hparams" / f"{recipe}.json")
        root = write_oct_h5(tmp_path / "layers.h5")
    line = _one_line_error(["fit", "--config", config, "--data.init_args.root", str(root), "--comet", "false",
                            "--trainer.default_root_dir", str(tmp_path / "runs"), option, value], capsys)  # fmt: skip
    assert line.startswith(f"octlightning: config error: {answer}"), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("typo", "answer"),
    [
        (["--model.init_args.lrr", "1e-3"], "SegmentationTask takes no argument 'lrr'; did you mean 'lr'?"),
        (
            ["--data.init_args.batchsize", "2"],
            "FundusVesselDataModule takes no argument 'batchsize'; did you mean 'batch_size'",
        ),
        # argparse would have expanded this abbreviation to --trainer.max_epochs without a word
        (["--trainer.max_epoch", "2"], "unknown option --trainer.max_epoch; did you mean --trainer.max_epochs"),
        # a value of the wrong type or outside the choices: the usage and a Union-of-subtypes listing
        (["--data.init_args.batch_size", "abc"], "--data.init_args.batch_size: expected int, got abc"),
        (
            ["--model.init_args.optimizer", "adamw2"],
            "--model.init_args.optimizer: expected one of 'adam', 'adamw', 'sgd', got adamw2",
        ),
        (["--model.init_args.net.init_args.depth", "four"], "--model.init_args.net.init_args.depth: expected int"),
        (["--config", "hparams/no_such_recipe.json"], "--config: File does not exist:"),
    ],
)
def test_a_misspelt_option_or_a_wrong_value_stops_with_one_line_naming_what_it_takes(typo, answer, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(["fit", "--config", VESSEL, *typo, "--comet", "false"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: {answer}" in err
    assert len(err.splitlines()) <= 3, err  # not the 70-line usage
