"""The vessel recipe through the real CLI: fit/validate/test/predict, run folder, Comet archive."""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import warnings
import zipfile
from pathlib import Path

import pytest

from octlightning.cli import SEED_DEFAULT, TRAINER_DEFAULTS, run_cli
from octlightning.links import DATA_DETERMINES
from tests.conftest import REPO, TINY_VESSEL

CONFIG = str(REPO / "hparams" / "vessel_unet.json")


def _args(subcommand: str, drive_root: Path, runs: Path, *extra: str) -> list[str]:
    return [
        subcommand,
        "--config",
        CONFIG,
        "--data.init_args.root",
        str(drive_root),
        "--trainer.default_root_dir",
        str(runs),
        *TINY_VESSEL,
        *extra,
    ]


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_every_subcommand_runs_with_fast_dev_run(subcommand, drive_root, tmp_path):
    run_cli(_args(subcommand, drive_root, tmp_path, "--trainer.fast_dev_run", "true"))


@pytest.fixture(scope="module")
def trained_run(drive_root, tmp_path_factory):
    """Two short epochs of the real recipe (shrunk), logged to CSV and an offline Comet archive."""
    runs = tmp_path_factory.mktemp("runs")
    cli = run_cli(
        _args(
            "fit",
            drive_root,
            runs,
            "--trainer.max_epochs",
            "2",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--overlay_every_n_epochs",
            "1",
        )
    )
    return runs, Path(cli.trainer.log_dir)


def test_fit_writes_the_run_folder(trained_run):
    runs, run_dir = trained_run
    assert run_dir == runs / "vessel_unet" / "version_0"
    for name in ("config.yaml", "metrics.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "overlays").glob("epoch_001/*.png"))
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val = [r for r in rows if r.get("val/dice")]
    assert len(val) == 2
    for key in ("val/dice", "val/iou", "val/accuracy", "val/sensitivity", "val/specificity", "val/auroc"):
        assert 0.0 <= float(val[-1][key]) <= 1.0


def test_comet_offline_archive_holds_the_logged_metrics(trained_run):
    _, run_dir = trained_run
    archives = list(run_dir.glob("*.zip"))
    assert len(archives) == 1, "exactly one Comet experiment per run"
    with zipfile.ZipFile(archives[0]) as zf:
        text = "\n".join(
            zf.read(n).decode("utf-8", "replace") for n in zf.namelist() if n.endswith((".json", ".jsonl"))
        )
    assert "val/dice" in text and "train/loss" in text
    assert "lr" in text  # hyperparameters reached Comet


def test_test_writes_per_image_csv_into_the_run_of_its_checkpoint(trained_run, drive_root):
    runs, run_dir = trained_run
    best = run_dir / "checkpoints" / "best.ckpt"
    cli = run_cli(_args("test", drive_root, runs, "--ckpt_path", str(best), "--comet", "false"))
    test_dir = Path(cli.trainer.default_root_dir)
    assert test_dir == runs / "vessel_unet" / "version_0" / "test"
    rows = list(csv.DictReader(open(test_dir / "test_metrics.csv")))
    assert [r["id"] for r in rows] == ["01", "02"]
    for r in rows:
        assert 0 <= float(r["dice"]) <= 1 and 0 <= float(r["specificity"]) <= 1


def test_predict_writes_masks_at_original_size_and_overlays(trained_run, drive_root):
    runs, run_dir = trained_run
    from PIL import Image

    cli = run_cli(
        _args(
            "predict", drive_root, runs, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), "--comet", "false"
        )
    )
    out = run_dir / "predictions"
    assert cli.model.run_dir / "predictions" == out
    assert not cli.trainer.predict_loop.return_predictions  # written to disk, not also kept in memory
    for sid in ("01_test", "02_test"):  # the input files' stems (test/images/01_test.tif)
        for kind in ("prob", "mask", "overlay"):
            im = Image.open(out / f"{sid}_{kind}.png")
            assert im.size == (72, 64), (sid, kind)
        assert set(Image.open(out / f"{sid}_mask.png").getdata()) <= {0, 255}


def test_resuming_a_named_version_continues_from_last_ckpt(drive_root, tmp_path, capsys):
    args = _args(
        "fit",
        drive_root,
        tmp_path,
        "--version",
        "run_a",
        "--comet",
        "false",
        "--overlay_every_n_epochs",
        "0",
        "--trainer.check_val_every_n_epoch",
        "1",
    )
    run_cli([*args, "--trainer.max_epochs", "1"])
    run_dir = tmp_path / "vessel_unet" / "run_a"
    # said at the start, so that a user whose run is killed knows what resumes it
    assert f"fit: writing {run_dir}; if it stops, the same command with --version run_a" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli([*args, "--trainer.max_epochs", "2"])
    assert f"resuming {run_dir} from" in capsys.readouterr().err
    # resuming in place is the point: no "Checkpoint directory ... exists and is not empty" warning
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert cli.trainer.current_epoch == 2
    rows = list(csv.DictReader(open(tmp_path / "vessel_unet" / "run_a" / "metrics.csv")))
    # the first epoch's metrics are kept, the resumed run adds the second
    assert {int(r["epoch"]) for r in rows if r.get("val/dice")} == {0, 1}


def test_api_key_never_lands_in_the_run_folder(drive_root, tmp_path, monkeypatch):
    secret = "sk-test-9f8e7d6c5b4a"
    monkeypatch.setenv("COMET_API_KEY", secret)
    cli = run_cli(_args("fit", drive_root, tmp_path, "--trainer.max_epochs", "1", "--comet", "false"))
    for path in Path(cli.trainer.log_dir).rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_every_hparams_file_parses():
    for config in sorted((REPO / "hparams").glob("*.json")):
        json.loads(config.read_text())
        with pytest.raises(SystemExit) as exc:
            run_cli(["fit", "--config", str(config), "--print_config"])
        assert exc.value.code == 0, config.name


def test_no_recipe_types_what_the_data_determines_or_the_shared_trainer_settings():
    def keys(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield f"{path}.{k}".lstrip("."), k
                yield from keys(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from keys(v, f"{path}[{i}]")

    for config in sorted((REPO / "hparams").glob("*.json")):
        recipe = json.loads(config.read_text())
        typed = [p for p, k in keys(recipe.get("model", {})) if k in DATA_DETERMINES]
        assert not typed, f"{config.name} sets {typed}: the data determines them"
        shared = [k for k, v in recipe.get("trainer", {}).items() if TRAINER_DEFAULTS.get(k, object()) == v]
        assert not shared, f"{config.name} repeats the shared trainer settings {shared}"
        assert "seed_everything" not in recipe or recipe["seed_everything"] != SEED_DEFAULT, config.name


def test_every_argument_of_a_published_recipes_classes_has_help():
    # `--data.help CLASS` showed "(type: int, default: 0)" alone for batch_size, num_folds, image_key...:
    # jsonargparse reads one Google-style "Args:" entry per name (a class's own, else a base class's)
    from jsonargparse._optionals import parse_docs

    def class_paths(node):
        if isinstance(node, dict):
            if "class_path" in node:
                yield node["class_path"]
            for value in node.values():
                yield from class_paths(value)
        elif isinstance(node, list):
            for value in node:
                yield from class_paths(value)

    paths = {p for config in (REPO / "hparams").glob("*.json") for p in class_paths(json.loads(config.read_text()))}
    assert len(paths) > 10
    for path in sorted(paths):
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        documented = parse_docs(cls.__init__, cls, None)
        arguments = [
            n for n, p in inspect.signature(cls).parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        assert not [a for a in arguments if a not in documented], path
