"""Run folders: ``--ckpt_path last``, test/predict next to the model that made them, failed runs leave nothing,
``check-data`` reports every broken file."""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import pytest

from octlightning.check_data import main as check_data_main
from octlightning.cli import checkpoint_run_dir, is_checkpoint_keyword, run_cli
from octlightning.data.mask_folder import ISIC_TEST, ISIC_TRAIN, ISIC_VAL
from octlightning.errors import ConfigError, DataError
from tests.conftest import REPO, TINY_VESSEL
from tests.fixtures.isic import write_isic_layout
from tests.fixtures.oct_layers import write_oct_h5

VESSEL = str(REPO / "hparams" / "vessel_unet.json")
ISIC = str(REPO / "hparams" / "isic_deeplabv3plus.json")


def _args(subcommand: str, drive_root: Path, runs: Path, *extra: str) -> list[str]:
    return [subcommand, "--config", VESSEL, "--data.init_args.root", str(drive_root),
            "--trainer.default_root_dir", str(runs), *TINY_VESSEL, "--overlay_every_n_epochs", "0",
            "--data.init_args.patch_size", "32", "--data.init_args.patches_per_image", "1", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(drive_root, tmp_path_factory) -> Path:
    """One short fit: ``<runs>/vessel_unet/version_0``."""
    runs = tmp_path_factory.mktemp("runs")
    run_cli(_args("fit", drive_root, runs, "--trainer.max_epochs", "1", "--comet", "false",
                  "--trainer.check_val_every_n_epoch", "1"))
    return runs / "vessel_unet" / "version_0"


def test_test_of_a_runs_checkpoint_writes_into_that_run(fitted, drive_root, capsys):
    runs = fitted.parent.parent
    config = (fitted / "config.yaml").read_text()
    metrics = (fitted / "metrics.csv").read_text()
    run_cli(_args("test", drive_root, runs, "--ckpt_path", str(fitted / "checkpoints" / "best.ckpt")))
    rows = list(csv.DictReader(open(fitted / "test" / "test_metrics.csv")))
    assert [r["id"] for r in rows] == ["01", "02"]
    assert (fitted / "test" / "config.yaml").is_file() and list((fitted / "test").glob("*.zip"))  # Comet archive
    assert any(r.get("test/dice") for r in csv.DictReader(open(fitted / "test" / "metrics.csv")))
    # fit's own files are untouched, and no new version folder was opened
    assert (fitted / "config.yaml").read_text() == config and (fitted / "metrics.csv").read_text() == metrics
    assert sorted(p.name for p in fitted.parent.iterdir()) == ["version_0"]
    assert f"octlightning: test: metrics.csv and per-sample tables in {fitted / 'test'}" in capsys.readouterr().err


def test_test_without_a_checkpoint_says_it_scores_an_untrained_network(fitted, drive_root, tmp_path):
    # it scored a randomly initialised network and exited 0 without a word (a new user's trial)
    untrained = r"test without --ckpt_path uses the network as the config builds it, untrained"
    with pytest.warns(UserWarning, match=untrained):
        run_cli(_args("test", drive_root, tmp_path / "runs", "--comet", "false"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(_args("test", drive_root, tmp_path / "runs", "--comet", "false",
                      "--ckpt_path", str(fitted / "checkpoints" / "best.ckpt")))  # fmt: skip
    assert not [w for w in caught if "without --ckpt_path" in str(w.message)]


def test_a_second_test_of_a_run_sets_the_earlier_results_aside(fitted, drive_root, capsys):
    """A test stopped part-way had replaced the earlier test's config.yaml and left its results: the folder
    paired one command's settings with another's numbers (a new user's trial)."""
    runs, ckpt = fitted.parent.parent, str(fitted / "checkpoints" / "best.ckpt")
    run_cli(_args("test", drive_root, runs, "--ckpt_path", ckpt, "--comet", "false"))
    first = (fitted / "test" / "test_metrics.csv").read_text()
    before = set((fitted / "test").glob("earlier-*"))
    run_cli(_args("test", drive_root, runs, "--ckpt_path", ckpt, "--comet", "false",
                  "--data.init_args.eval_batch_size", "1"))  # fmt: skip
    (aside,) = set((fitted / "test").glob("earlier-*")) - before
    assert (aside / "test_metrics.csv").read_text() == first and (aside / "config.yaml").is_file()
    assert "eval_batch_size: 1" in (fitted / "test" / "config.yaml").read_text()
    assert (fitted / "test" / "test_metrics.csv").is_file()
    assert f"test: the earlier results in {fitted / 'test'} moved to {aside}" in capsys.readouterr().err


def test_predict_of_a_runs_checkpoint_writes_its_predictions_folder(fitted, drive_root, capsys):
    runs = fitted.parent.parent
    config = (fitted / "config.yaml").read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(_args("predict", drive_root, runs, "--ckpt_path", str(fitted / "checkpoints" / "last.ckpt"),
                      "--comet", "false"))  # fmt: skip
    # fit's checkpoint callbacks have no business in predict: restoring their state warned "The dirpath
    # has changed from .../checkpoints to .../predictions/checkpoints", and without them Lightning asks
    # for them ("callbacks used to create the checkpoint need to be provided")
    assert not [w for w in caught if "dirpath" in str(w.message) or "callbacks used to" in str(w.message)]
    out = fitted / "predictions"
    names = sorted(p.name for p in out.glob("01_*.png"))
    assert names == ["01_test_mask.png", "01_test_overlay.png", "01_test_prob.png"]  # the input stem 01_test
    assert (out / "config.yaml").is_file() and (fitted / "config.yaml").read_text() == config
    assert sorted(p.name for p in fitted.parent.iterdir()) == ["version_0"]
    assert f"octlightning: predict: predictions in {out}" in capsys.readouterr().err  # which version folder


def test_the_runs_own_config_yaml_tests_into_that_run(fitted, drive_root):
    """config.yaml stores the run's experiment: it names the checkpoint's own run, not a new version."""
    cli = run_cli(["test", "--config", str(fitted / "config.yaml"), "--comet", "false",
                   "--experiment", fitted.parent.name,  # what a run started with --experiment saves
                   "--ckpt_path", str(fitted / "checkpoints" / "best.ckpt")])  # fmt: skip
    assert Path(cli.trainer.default_root_dir) == fitted / "test"
    assert sorted(p.name for p in fitted.parent.iterdir()) == ["version_0"]


def test_a_named_version_still_decides_where_test_writes(fitted, drive_root):
    runs = fitted.parent.parent
    cli = run_cli(_args("test", drive_root, runs, "--ckpt_path", str(fitted / "checkpoints" / "best.ckpt"),
                        "--comet", "false", "--version", "scored"))  # fmt: skip
    assert Path(cli.trainer.default_root_dir) == fitted.parent / "scored"
    assert (fitted.parent / "scored" / "test_metrics.csv").is_file()


def test_testing_into_the_fit_s_own_version_keeps_its_config_yaml(drive_root, tmp_path):
    # what a sweep's test stage does: test --version <the run> --ckpt_path <the run's best.ckpt>
    common = ("--comet", "false", "--version", "k")
    run_cli(_args("fit", drive_root, tmp_path, "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
                  *common))  # fmt: skip
    run = tmp_path / "vessel_unet" / "k"
    fit_config = (run / "config.yaml").read_text()
    run_cli(_args("test", drive_root, tmp_path, "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), *common))
    # the record of how the run was trained was overwritten by the test command's config
    assert (run / "config.yaml").read_text() == fit_config
    assert "best.ckpt" in (run / "config-test.yaml").read_text()
    assert any(r.get("test/dice") for r in csv.DictReader(open(run / "metrics.csv")))


def test_a_run_that_never_validated_says_so_and_test_of_its_best_ckpt_names_last_ckpt(drive_root, tmp_path, capsys):
    run_cli(_args("fit", drive_root, tmp_path, "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "2",
                  "--comet", "false", "--version", "short"))  # fmt: skip
    run = tmp_path / "vessel_unet" / "short"
    # it announced "checkpoints (best.ckpt, last.ckpt)", and README's test command then met a traceback
    assert "checkpoints (last.ckpt; no best.ckpt: no validation ran" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"best.ckpt: no such checkpoint file; .* holds last.ckpt .*use last.ckpt"):
        run_cli(_args("test", drive_root, tmp_path, "--ckpt_path", str(run / "checkpoints" / "best.ckpt")))
    assert not (run / "test").exists()  # stopped before any logger or Comet archive


def test_a_checkpoint_of_another_recipe_is_a_config_error_naming_its_run(fitted, tmp_path):
    """It was a 12 KB traceback of weight names from Lightning's load, after a run folder and a Comet
    archive had been made."""
    ckpt = str(fitted / "checkpoints" / "best.ckpt")
    runs = tmp_path / "runs"
    files_before = sorted(fitted.rglob("*"))
    common = ["--data.init_args.root", str(tmp_path), "--trainer.default_root_dir", str(runs), "--ckpt_path", ckpt]
    # the same task (segmentation), another network
    isic = ["test", "--config", ISIC, "--model.init_args.net.init_args.encoder_name", "resnet18", *common]
    with pytest.raises(ConfigError, match=r"best.ckpt: its network is not the one this config builds: \d+ weights"):
        run_cli(isic)
    # another task; the message names the config that fits the checkpoint
    oct_layers = ["test", "--config", str(REPO / "hparams" / "oct_unet.json"), *common]
    oct_layers += ["--data.init_args.root", str(write_oct_h5(tmp_path / "oct.h5"))]  # read by the data links
    with pytest.raises(ConfigError) as err:
        run_cli(oct_layers)
    assert "a checkpoint of octlightning.tasks.segmentation.SegmentationTask, but this config's model is " \
        "octlightning.tasks.layer_regression.LayerRegressionTask" in str(err.value)  # fmt: skip
    assert f"--config {fitted / 'config.yaml'}" in str(err.value)
    # a file torch.save did not write (an image given a .ckpt name)
    not_ckpt = tmp_path / "weights.ckpt"
    not_ckpt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ConfigError, match=r"weights.ckpt: not a checkpoint \(not a file torch.save wrote\)"):
        run_cli([*isic[:-1], str(not_ckpt)])
    assert not runs.exists() and sorted(fitted.rglob("*")) == files_before  # nothing written anywhere


def test_lightnings_ckpt_path_keywords_are_not_checkpoint_files():
    # Lightning resolves these itself (a registry reference in any case, as its _is_registry does);
    # "no such checkpoint file" for them would stop a valid command
    for keyword in ("best", "last", "hpc", "registry", "registry:unet", "REGISTRY:unet:v2"):
        assert is_checkpoint_keyword(keyword) and checkpoint_run_dir(keyword) is None
    for path in ("best.ckpt", "runs/x/version_0/checkpoints/last.ckpt", "my_registry.ckpt"):
        assert not is_checkpoint_keyword(path)


def test_ckpt_path_last_resumes_the_latest_version_or_names_version(drive_root, tmp_path):
    common = ["--comet", "false", "--trainer.check_val_every_n_epoch", "1", "--checkpoint_every_s", "0"]
    with pytest.raises(ConfigError, match="--version"):
        run_cli(_args("fit", drive_root, tmp_path, *common, "--ckpt_path", "last", "--trainer.max_epochs", "1"))
    experiment = tmp_path / "vessel_unet"
    assert not experiment.exists() or not list(experiment.iterdir()), "no empty version folder"

    run_cli(_args("fit", drive_root, tmp_path, *common, "--trainer.max_epochs", "1"))  # version_0
    cli = run_cli(_args("fit", drive_root, tmp_path, *common, "--ckpt_path", "last", "--trainer.max_epochs", "2"))
    assert sorted(p.name for p in experiment.iterdir()) == ["version_0"]
    assert cli.trainer.current_epoch == 2 and Path(cli.trainer.default_root_dir) == experiment / "version_0"
    rows = list(csv.DictReader(open(experiment / "version_0" / "metrics.csv")))
    assert sorted({int(r["epoch"]) for r in rows if r.get("val/dice")}) == [0, 1]

    with pytest.raises(ConfigError, match="--version"):
        run_cli(_args("fit", drive_root, tmp_path, *common, "--ckpt_path", "last", "--version", "nothing_here"))


def test_a_fit_that_cannot_resume_its_named_version_starts_over_with_the_earlier_files_set_aside(
    drive_root, tmp_path, capsys
):
    common = ["--comet", "false", "--trainer.check_val_every_n_epoch", "1", "--trainer.max_epochs", "1"]
    run_cli(_args("fit", drive_root, tmp_path, *common, "--version", "k"))
    run = tmp_path / "vessel_unet" / "k"
    (run / "checkpoints" / "last.ckpt").unlink()  # killed (SIGKILL) before its first last.ckpt
    (run / "status.json").write_text("{}")  # a sweep's own file: it stays where the sweep reads it
    capsys.readouterr()
    run_cli(_args("fit", drive_root, tmp_path, *common, "--version", "k"))
    assert "no last.ckpt to resume" in capsys.readouterr().err
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows if r.get("val/dice")] == ["0"], "the earlier fit's rows are not repeated"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no best-v1
    (earlier,) = run.glob("earlier-*")
    assert (earlier / "metrics.csv").is_file() and (earlier / "checkpoints" / "best.ckpt").is_file()
    assert (run / "status.json").is_file() and not (earlier / "status.json").exists()

    # Resuming from the run's own checkpoint, named by another spelling of its path, moves nothing.
    own = run / ".." / "k" / "checkpoints" / "last.ckpt"
    run_cli(_args("fit", drive_root, tmp_path, *common, "--version", "k", "--ckpt_path", str(own)))
    assert len(list(run.glob("earlier-*"))) == 1 and (run / "metrics.csv").is_file()


def test_fit_on_broken_data_leaves_no_run_folder_and_no_comet_archive(drive_root, tmp_path):
    broken = tmp_path / "drive"
    shutil.copytree(drive_root, broken)
    image = broken / "training" / "images" / "23_training.tif"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    runs = tmp_path / "runs"
    with pytest.raises(DataError, match="23_training.tif"):
        run_cli(_args("fit", broken, runs, "--comet", "true", "--trainer.max_epochs", "1"))
    assert not runs.exists() or not list(runs.rglob("*")), sorted(runs.rglob("*"))


def test_test_on_broken_data_leaves_the_run_folder_as_it_was(fitted, drive_root, tmp_path):
    broken = tmp_path / "drive"
    shutil.copytree(drive_root, broken)
    image = sorted((broken / "test" / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    before = sorted(fitted.rglob("*"))
    best = str(fitted / "checkpoints" / "best.ckpt")
    with pytest.raises(DataError, match=image.name):
        run_cli(_args("test", drive_root, fitted.parent.parent, "--ckpt_path", best,
                      "--data.init_args.test_dir", str(broken), "--comet", "true"))  # fmt: skip
    assert sorted(fitted.rglob("*")) == before  # no test/ folder, no Comet archive


def test_check_data_names_every_broken_file_of_every_split_without_building_the_model(tmp_path, capsys):
    root = write_isic_layout(tmp_path / "isic", with_val=True, with_test=True)
    broken = [
        sorted((root / ISIC_TRAIN[0]).glob("*.jpg"))[0],  # a training image cut short
        sorted((root / ISIC_VAL[0]).glob("*.jpg"))[0],  # a validation image cut short
        sorted((root / ISIC_TEST[1]).glob("*.png"))[0],  # a test mask cut short (its path says "Test")
    ]
    for path in broken:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    weights = tmp_path / "no_such_resnet50.pth"  # the model is never built: its weights are not needed
    status = check_data_main(["--config", ISIC, "--data.init_args.root", str(root),
                              "--model.init_args.net.init_args.encoder_weights", str(weights),
                              "--data.init_args.num_workers", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1
    assert "3 problems" in err, err
    for path in broken:
        assert path.name in err, (path.name, err)
    assert "Traceback" not in err and str(weights) not in err


def test_check_data_answers_options_the_datamodule_refuses_with_one_line(tmp_path, capsys):
    # a fold out of range ended check-data in a 28-line traceback (a new user's trial)
    root = write_isic_layout(tmp_path / "isic", with_test=False)
    status = check_data_main(["--config", ISIC, "--data.init_args.root", str(root),
                              "--data.init_args.num_folds", "5", "--data.init_args.fold", "5"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert "check-data: FAILED: --data.init_args.num_folds must be 0 (none) or >= 2, and --data.init_args.fold" in err
