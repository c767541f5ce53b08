"""RETOUCH fluid segmentation: MetaImage layout, cached preprocessing, patch sampling, tiled inference,
plain and adversarial training through the CLI, and the shared RETOUCH-layout data."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from octlightning.check_data import check_datamodule
from octlightning.cli import run_cli
from octlightning.data.retouch import RetouchDataModule, find_cases, fluid_window_counts
from octlightning.errors import DataError
from octlightning.inference import sliding_window, tile_starts
from octlightning.models.discriminator import PairDiscriminator
from octlightning.models.unet import UNet
from tests.conftest import CPU_TRAINER, REPO, run_octlightning, shared
from tests.fixtures.retouch import (
    CHALLENGE_CASES,
    DIRECTION,
    ORIGIN,
    SPACING,
    TEST_CASE,
    synthetic_case,
    write_challenge_layout,
    write_mhd,
    write_retouch_layout,
)

PATCH = [32, 32]  # height, width








@pytest.fixture(scope="module")
def retouch_root(tmp_path_factory) -> Path:
    return write_retouch_layout(tmp_path_factory.mktemp("retouch"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("retouch_cache")


def _dm(root, cache, **kw) -> RetouchDataModule:
    args = dict(batch_size=4, num_workers=0, patch_size=PATCH, val_fraction=0.34, test_fraction=0.34)
    args.update(kw)
    return RetouchDataModule(str(root), cache_dir=str(cache), **args)


# --------------------------------------------------------------------------- layout and cache
def test_layout_vendors_splits_and_whole_bscan_samples(retouch_root, cache_dir):
    cases = find_cases(retouch_root)
    assert [(c.name, c.vendor, c.labelled) for c in cases] == [
        ("TEST001", "Cirrus", False),
        *[(f"TRAIN{i:03d}", "Cirrus", True) for i in (1, 2, 3)],
        *[(f"TRAIN{i:03d}", "Spectralis", True) for i in (4, 5, 6)],
    ]
    dm = _dm(retouch_root, cache_dir)
    parts = dm.split()
    # by case, one of each vendor per part, the unlabelled case in none
    vendor = {c.name: c.vendor for c in cases}
    for part in ("train", "val", "test"):
        assert sorted(vendor[c] for c in parts[part]) == ["Cirrus", "Spectralis"], parts
    assert sorted(sum(parts.values(), [])) == [f"TRAIN{i:03d}" for i in range(1, 7)]
    assert _dm(retouch_root, cache_dir).split() == parts  # seeded

    dm.setup("test")
    sample = dm.test_set[1]
    case = parts["test"][0]
    assert sample["id"] == f"{case}_001" and sample["volume"] == case
    assert sample["image"].shape == sample["mask"].shape == (1, 64, 48)
    assert sorted(sample["mask"].unique().tolist()) == [0.0, 1.0, 2.0]
    assert sample["voxel_mm3"] == pytest.approx(np.prod(SPACING))
    assert sample["spacing"].tolist() == pytest.approx(list(SPACING))
    assert (sample["slice"], sample["num_slices"]) == (1, 4)

    rows = list(csv.DictReader(open(dm.store().path / "index.csv")))
    assert len(rows) == 7 * 4
    by_slice = {(r["case"], int(r["slice"])): r for r in rows}
    assert by_slice[("TRAIN004", 1)] == {
        "case": "TRAIN004",
        "vendor": "Spectralis",
        "slice": "1",
        "IRF": "1",
        "SRF": "1",
        "PED": "0",
    }
    assert by_slice[("TRAIN004", 2)]["PED"] == "1" and by_slice[("TRAIN004", 0)]["IRF"] == "0"
    assert by_slice[("TEST001", 0)]["IRF"] == ""  # prediction-only: presence unknown


def test_cross_validation_folds_test_each_case_once_and_every_vendor_in_each_fold(retouch_root, cache_dir):
    vendor = {c.name: c.vendor for c in find_cases(retouch_root)}
    tested: list[str] = []
    for fold in range(3):
        parts = _dm(retouch_root, cache_dir, num_folds=3, fold=fold, val_fraction=0.5).split()
        assert sorted(vendor[c] for c in parts["test"]) == ["Cirrus", "Spectralis"]  # stratified by vendor
        assert not (set(parts["train"]) | set(parts["val"])) & set(parts["test"])
        tested += parts["test"]
    assert sorted(tested) == [f"TRAIN{i:03d}" for i in range(1, 7)]
    # two folds of 3 cases per vendor leave one per vendor: nothing to validate on, and why
    said = r"no validation cases: val_fraction 0.2 of each vendor's labelled cases outside the test split, "
    with pytest.raises(DataError, match=said + r"test = fold 0 of 2 \((Cirrus|Spectralis) 1, .*rounds to none"):
        _dm(retouch_root, cache_dir, num_folds=2, fold=0, val_fraction=0.2).setup("fit")
    with pytest.raises(ValueError, match="test_cases.*num_folds must then be 0"):
        _dm(retouch_root, cache_dir, num_folds=3, test_cases=["TRAIN001"])


def test_vendor_option_names_the_device_of_a_folder_without_one_and_unknown_vendor_is_an_error(tmp_path):
    image, labels = synthetic_case(np.random.default_rng(1), False)
    write_mhd(image, tmp_path / "CASE_A" / "oct.mhd")
    write_mhd(labels, tmp_path / "CASE_A" / "reference.mhd")
    with pytest.raises(DataError, match="CASE_A.*--data.init_args.vendor"):
        find_cases(tmp_path)
    assert find_cases(tmp_path, "topcon")[0].vendor == "Topcon"
    with pytest.raises(DataError, match="CASE_A.*unknown vendor 'Nidek'"):
        find_cases(tmp_path, "Nidek")


def test_preprocessing_cache_is_reused_and_rebuilt_when_settings_or_files_change(tmp_path):
    root = write_retouch_layout(tmp_path / "data", seed=2)
    cache = tmp_path / "cache"
    first = _dm(root, cache).store().path
    stamp = (first / "meta.json").stat().st_mtime_ns
    again = _dm(root, cache).store().path
    assert again == first and (first / "meta.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    changed = _dm(root, cache, median_size=5).store().path
    assert changed != first and (changed / "meta.json").is_file()
    assert json.loads((changed / "meta.json").read_text())["settings"]["median_size"] == 5
    no_matching = _dm(root, cache, histogram_reference=None).store()
    assert no_matching.path not in (first, changed)
    # histogram matching changes Cirrus volumes only (Spectralis is the reference)
    matched = _dm(root, cache).store()
    assert np.array_equal(matched.array("TRAIN004", "oct"), no_matching.array("TRAIN004", "oct"))
    assert not np.array_equal(matched.array("TRAIN001", "oct"), no_matching.array("TRAIN001", "oct"))
    # a changed source file gives a new cache
    raw = root / "RETOUCH-TrainingSet-Cirrus" / "TRAIN001" / "oct.raw"
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    assert _dm(root, cache).store().path not in (first, changed)


def test_predict_dir_cases_are_matched_to_the_training_reference(retouch_root, cache_dir, tmp_path, caplog):
    other = tmp_path / "new_cases"
    image, _ = synthetic_case(np.random.default_rng(5), sixteen_bit=False)
    write_mhd(image, other / "NEW_Topcon_01" / "oct.mhd")
    dm = _dm(retouch_root, cache_dir, predict_dir=str(other))
    dm.prepare_data()
    dm.setup("predict")
    assert dm.predict_set.items == [("NEW_Topcon_01", z) for z in range(4)]
    sample = dm.predict_set[0]
    assert "mask" not in sample and sample["volume"] == "NEW_Topcon_01"
    # the new (Topcon) case is matched to the training set's Spectralis histogram
    np.testing.assert_allclose(dm.predict_store().reference_hist, dm.store().reference_hist)
    assert dm.predict_store().path != dm.store().path
    # without predict_dir, predict takes the root's cases without reference
    dm = _dm(retouch_root, cache_dir)
    with caplog.at_level("INFO"):
        dm.setup("predict")
    assert {case for case, _ in dm.predict_set.items} == {"TEST001"}
    assert f"predicting the cases without reference.mhd of {retouch_root}: ['TEST001']" in caplog.text
    # ... and, where every case has a reference, the test cases: said, as which ones are (never silently)
    labelled_only = tmp_path / "labelled_only"
    shutil.copytree(retouch_root, labelled_only)
    for case in list(labelled_only.rglob("TEST001")):
        shutil.rmtree(case)
    dm = _dm(labelled_only, cache_dir)
    caplog.clear()
    with caplog.at_level("INFO"):
        dm.setup("predict")
    test_cases = dm.split()["test"]
    assert sorted({case for case, _ in dm.predict_set.items}) == test_cases
    assert f"predicting the test cases (every case has a reference.mhd) of {labelled_only}: {test_cases}" in caplog.text
    assert f"cases by split (seed {dm.seed}): train" in caplog.text and f"test {test_cases}" in caplog.text


def test_patches_honour_the_positive_ratio_and_are_centred_in_the_roi(retouch_root, cache_dir):
    dm = _dm(retouch_root, cache_dir, positive_fraction=0.25, patches_per_epoch=40)
    dm.setup("fit")
    ds = dm.train_set
    store = dm.store()
    torch.manual_seed(0)
    samples = [ds[i] for i in range(len(ds))]
    with_fluid = [bool((s["mask"] > 0).any()) for s in samples]
    assert sum(with_fluid) == 10  # exactly 25 % of the epoch
    assert all(with_fluid[:10]) and not any(with_fluid[10:])  # negatives hold no fluid at all
    classes = set()
    for s in samples:
        assert s["image"].shape == s["mask"].shape == s["fov"].shape == (1, *PATCH)
        case, z = s["id"].rsplit("_", 1)
        cy, cx = s["centre"].tolist()
        assert store.array(case, "roi")[int(z), cy, cx] == 1
        assert case in dm.split()["train"]
        classes |= set(s["mask"].unique().int().tolist())
    assert classes == {0, 1, 2, 3}  # balanced fluid classes: all three seen
    # per-epoch resampling, reproducible from the seed
    torch.manual_seed(0)
    ds.transform._seed = None  # the augmentation restarts from the seed too
    replay = [ds[i] for i in range(4)]
    assert torch.equal(replay[3]["centre"], samples[3]["centre"]) and torch.equal(
        replay[3]["image"], samples[3]["image"]
    )
    assert {tuple(ds[i]["centre"].tolist()) for i in range(20)} != {tuple(s["centre"].tolist()) for s in samples[:20]}


def test_check_data_says_the_training_samples_are_patches_of_how_many_cases(retouch_root, cache_dir):
    dm = _dm(retouch_root, cache_dir, positive_fraction=0.25, patches_per_epoch=40)
    lines = check_datamodule(dm)
    # was "train: 40 samples", read as 40 B-scans or cases
    n_cases = len(dm.split()["train"])
    assert lines[0].startswith(f"train: 40 samples (random {PATCH[0]}x{PATCH[1]} patches, drawn anew every epoch "
                               f"from {n_cases} cases (")  # fmt: skip
    assert lines[0].endswith("B-scans), 10 centred on fluid)")


def test_fluid_window_counts_match_brute_force():
    rng = np.random.default_rng(0)
    fluid = rng.random((13, 11)) > 0.9
    counts = fluid_window_counts(fluid, (4, 5))
    for y in range(13):
        for x in range(11):
            assert counts[y, x] == fluid[max(0, y - 2) : y + 2, max(0, x - 2) : x + 3].sum()


# --------------------------------------------------------------------------- bad input
def _copy_case(tmp_path, mutate) -> RetouchDataModule:
    root = tmp_path / "data"
    image, labels = synthetic_case(np.random.default_rng(3), False)
    write_mhd(image, root / "TRAIN_Spectralis_001" / "oct.mhd")
    write_mhd(labels, root / "TRAIN_Spectralis_001" / "reference.mhd")
    mutate(root / "TRAIN_Spectralis_001", image, labels)
    return _dm(root, tmp_path / "cache")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d, im, lab: (d / "oct.raw").unlink(), "names data file oct.raw, which does not exist"),
        (lambda d, im, lab: (d / "reference.raw").write_bytes(b"\0" * 100), "reference.raw is 100 bytes.*truncated"),
        (lambda d, im, lab: write_mhd(lab[:, :, :40], d / "reference.mhd"), "reference.mhd is 4x64x40 but oct.mhd"),
        (lambda d, im, lab: write_mhd(lab * 2, d / "reference.mhd"), r"labels \[4, 6\] outside 0..3"),
        (lambda d, im, lab: write_mhd(im, d / "oct.mhd", compress=True) or _truncate(d / "oct.zraw"), "truncated"),
    ],
    ids=["missing-data-file", "short-raw", "shape-mismatch", "bad-labels", "short-zraw"],
)
def test_bad_input_is_an_error_naming_the_case(tmp_path, mutate, message):
    dm = _copy_case(tmp_path, mutate)
    with pytest.raises(DataError, match=f"TRAIN_Spectralis_001.*{message}"):
        dm.store()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


# --------------------------------------------------------------------------- tiled inference
@pytest.mark.parametrize("blend", ["gaussian", "linear", "constant"])
@pytest.mark.parametrize("size", [(37, 53), (10, 12), (64, 48)])
def test_sliding_window_of_identity_reproduces_the_input(blend, size):
    image = torch.randn(2, 3, *size)
    calls = []

    def net_fn(x):
        calls.append(x.shape[0])
        return x

    out = sliding_window(net_fn, image, (16, 24), overlap=0.5, blend=blend, tile_batch=5)
    assert out.shape == image.shape
    torch.testing.assert_close(out, image)
    tiles = len(tile_starts(max(size[0], 16), 16, 0.5)) * len(tile_starts(max(size[1], 24), 24, 0.5))
    assert sum(calls) == 2 * tiles and max(calls) <= 5


def test_tiles_cover_the_image_with_the_requested_overlap():
    starts = tile_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(0 < b - a <= 16 for a, b in zip(starts, starts[1:], strict=False))


def test_discriminator_scores_any_size_and_both_pairings():
    for pair in ("concat", "product"):
        disc = PairDiscriminator(in_channels=1, num_classes=4, base_channels=4, depth=3, pair=pair)
        assert disc(torch.randn(2, 1, 40, 24), torch.rand(2, 4, 40, 24)).shape == (2,)
    with pytest.raises(ValueError, match="3 channels"):
        disc(torch.randn(2, 1, 40, 24), torch.rand(2, 3, 40, 24))


# --------------------------------------------------------------------------- CLI
TINY = [
    "--model.init_args.net.init_args.base_channels",
    "4",
    "--model.init_args.net.init_args.depth",
    "2",
    "--model.init_args.sliding_window",
    json.dumps(PATCH),
    "--data.init_args.patch_size",
    json.dumps(PATCH),
    "--data.init_args.num_workers",
    "0",
    "--data.init_args.batch_size",
    "4",
    "--data.init_args.eval_batch_size",
    "4",
    "--data.init_args.val_cases",
    "null",
    "--data.init_args.test_cases",
    "null",
    "--data.init_args.val_fraction",
    "0.34",
    "--data.init_args.test_fraction",
    "0.34",
    *CPU_TRAINER,
    "--comet",
    "false",
]
TINY_DISC = [
    "--model.init_args.discriminator.init_args.base_channels",
    "4",
    "--model.init_args.discriminator.init_args.depth",
    "2",
]


def _cli(config: str, sub: str, root: Path, cache: Path, runs: Path, *extra: str):
    args = [sub, "--config", str(REPO / "hparams" / config), "--data.init_args.root", str(root)]
    args += ["--data.init_args.cache_dir", str(cache), "--trainer.default_root_dir", str(runs), *TINY]
    if "adversarial" in config:
        args += TINY_DISC
    return run_cli([*args, *extra])


@pytest.mark.parametrize("config", ["retouch_unet.json", "retouch_adversarial.json"])
def test_fit_test_predict_through_the_cli(config, retouch_root, cache_dir, tmp_path):
    fast = ["--trainer.fast_dev_run", "true"]
    adversarial = "adversarial" in config
    extra = []
    if adversarial:  # start the segmenter from a SegmentationTask checkpoint (network under `net.`)
        net_args = json.loads((REPO / "hparams" / config).read_text())["model"]["init_args"]["net"]["init_args"]
        torch.manual_seed(7)
        # channels and classes come from the data (grey B-scans; background + IRF, SRF, PED)
        net = UNet(**{**net_args, "in_channels": 1, "num_classes": 4, "base_channels": 4, "depth": 2})
        torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "seg.ckpt")
        extra = [
            "--model.init_args.segmentation_checkpoint",
            str(tmp_path / "seg.ckpt"),
            "--model.init_args.lr",
            "1e-3",
        ]
    cli = _cli(config, "fit", retouch_root, cache_dir, tmp_path, *fast, *extra)
    # manual optimisation counts one global step per optimizer step: two per batch when adversarial
    assert cli.trainer.global_step == (2 if adversarial else 1)
    ckpt = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    if adversarial:
        assert any(k.startswith("discriminator.") for k in saved["state_dict"])  # both networks kept
        assert len(saved["optimizer_states"]) == 2
        assert "discriminator" not in cli.model.hparams and "net" not in cli.model.hparams
        # one Adam step moves every weight by at most lr: the segmenter started from the checkpoint
        for k, v in net.state_dict().items():
            if v.is_floating_point() and "running" not in k:
                torch.testing.assert_close(cli.model.net.state_dict()[k], v, atol=1.1e-3, rtol=0, msg=k)

    cli = _cli(config, "test", retouch_root, cache_dir, tmp_path, *fast, "--ckpt_path", str(ckpt))
    run_dir = cli.model.run_dir
    volumes = list(csv.DictReader(open(run_dir / "test_volumes.csv")))
    assert len(volumes) == 1 and volumes[0]["slices"] == "4"  # one batch = one whole volume
    for fluid in ("IRF", "SRF", "PED"):
        ref = float(volumes[0][f"ref_mm3_{fluid}"])
        assert ref > 0  # every fluid is in every labelled case
        assert float(volumes[0][f"avd_mm3_{fluid}"]) == pytest.approx(abs(float(volumes[0][f"pred_mm3_{fluid}"]) - ref))
    slices = list(csv.DictReader(open(run_dir / "test_metrics.csv")))
    assert [r["id"] for r in slices] == [f"{volumes[0]['volume']}_{z:03d}" for z in range(4)]
    assert {"dice_IRF", "iou_PED"} <= set(slices[0])

    cli = _cli(config, "predict", retouch_root, cache_dir, tmp_path, *fast, "--ckpt_path", str(ckpt))
    out = cli.model.run_dir / "predictions"
    written = sitk.ReadImage(str(out / "TEST001" / "prediction.mhd"))  # the case without reference
    assert written.GetSize() == (48, 64, 4)  # x, y, z: the input's size
    assert written.GetSpacing() == pytest.approx(SPACING)
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2, 3}
    assert sorted(p.name for p in out.glob("TEST001_*_overlay.png")) == [
        f"TEST001_{z:03d}_overlay.png" for z in range(4)
    ]


# --------------------------------------------------------------------------- shared real data
@pytest.mark.realdata
def test_shared_retouch_layout_loads(tmp_path):
    root = shared("retouch_like")
    with pytest.raises(DataError, match="TRAIN_DUKE01"):
        find_cases(root)  # no vendor in the Duke case paths: the command passes it (README, Makefile)
    cases = find_cases(root, "Spectralis")
    assert [(c.name, c.vendor) for c in cases] == [("TRAIN_DUKE01", "Spectralis"), ("TRAIN_DUKE02", "Spectralis")]
    dm = RetouchDataModule(
        str(root), num_workers=0, cache_dir=str(tmp_path), vendor="Spectralis", val_cases=["TRAIN_DUKE02"]
    )
    store = dm.store()
    for name in ("TRAIN_DUKE01", "TRAIN_DUKE02"):
        info = store.cases[name]
        assert info.shape == (11, 496, 768)
        assert info.spacing == pytest.approx((0.01133, 0.00387, 0.492))
        assert set(np.unique(store.array(name, "reference"))) == {0, 1}
    rows = store.index()
    assert sum(r["IRF"] == "1" for r in rows if r["case"] == "TRAIN_DUKE01") == 9
    assert sum(r["IRF"] == "1" for r in rows if r["case"] == "TRAIN_DUKE02") == 7
    assert all(r["SRF"] == r["PED"] == "0" for r in rows)
    # the ROI is the retina band, not the whole B-scan
    roi_share = float(np.mean(store.array("TRAIN_DUKE01", "roi")))
    assert 0.15 < roi_share < 0.5
    dm.setup("fit")
    assert dm.split()["train"] == ["TRAIN_DUKE01"]
    patch = dm.train_set[0]
    assert patch["image"].shape == (1, 256, 128)
    assert patch["mask"].max() == 1








def tree(root: Path) -> list[tuple[str, int]]:
    """Every path below ``root`` with its modification time: what 'nothing written here' compares."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_challenge_layout_finds_every_case_at_any_depth_with_its_vendor(tmp_path):
    root = write_challenge_layout(tmp_path / "RETOUCH")
    cases = {c.name: c for c in find_cases(root)}
    # today's code looked two levels deep only: the Spectralis archive folder was silently left out
    assert sorted(cases) == ["TEST029", *sorted(sum(CHALLENGE_CASES.values(), ()))]
    assert {n: c.vendor for n, c in cases.items() if n.startswith("TRAIN0")} == {
        **dict.fromkeys(("TRAIN001", "TRAIN002", "TRAIN003"), "Cirrus"),
        **dict.fromkeys(("TRAIN025", "TRAIN026", "TRAIN027"), "Spectralis"),
        **dict.fromkeys(("TRAIN049", "TRAIN050", "TRAIN051"), "Topcon"),
    }
    assert cases["TEST029"].vendor == "Topcon" and not cases["TEST029"].labelled
    # one vendor set given as root: its own name tells the vendor
    single = find_cases(root / "RETOUCH-TrainingSet-Topcon")
    assert [(c.name, c.vendor) for c in single] == [(n, "Topcon") for n in ("TRAIN049", "TRAIN050", "TRAIN051")]
    # default splits: by case, one case of every vendor in validation and in test, seeded
    dm = RetouchDataModule(str(root), num_workers=0, cache_dir=str(tmp_path / "cache"))
    parts = dm.split()
    for part in ("train", "val", "test"):
        assert sorted(cases[c].vendor for c in parts[part]) == ["Cirrus", "Spectralis", "Topcon"], parts
    assert (dm.num_classes, dm.class_names, dm.in_channels) == (4, ["IRF", "SRF", "PED"], 1)


def test_a_path_naming_two_vendors_or_another_than_the_option_is_an_error(tmp_path):
    image, labels = synthetic_case(np.random.default_rng(4), False)
    write_mhd(image, tmp_path / "data" / "spectralis_exports" / "TRAIN_Cirrus_001" / "oct.mhd")
    # today's code took the first name it met (Spectralis) for this Cirrus case
    with pytest.raises(DataError, match="TRAIN_Cirrus_001.*several vendors.*Cirrus, Spectralis"):
        find_cases(tmp_path / "data")
    with pytest.raises(DataError, match="TRAIN_Cirrus_001.*names Cirrus but the vendor option says Topcon"):
        find_cases(tmp_path / "data" / "spectralis_exports", "Topcon")
    # below root, the path wins over root's own name
    assert find_cases(tmp_path / "data" / "spectralis_exports")[0].vendor == "Cirrus"
    assert find_cases(tmp_path / "data" / "spectralis_exports", "cirrus")[0].vendor == "Cirrus"


def test_the_cache_goes_to_the_user_cache_folder_never_into_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = write_challenge_layout(tmp_path / "RETOUCH")
    before = tree(root)
    store = RetouchDataModule(str(root), num_workers=0).store()
    assert store.path.is_relative_to(tmp_path / "xdg" / "octlightning" / "retouch")
    assert tree(root) == before  # today's code wrote <root>/.octlightning-cache into a writable dataset
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert RetouchDataModule(str(root)).cache_dir.is_relative_to(tmp_path / "home" / ".cache" / "octlightning")


def test_published_recipe_runs_on_the_challenge_layout_and_predictions_keep_the_scan_geometry(tmp_path, monkeypatch):
    """check-data, a one-step fit and predict through the command, published hparams, only the root changed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = write_challenge_layout(tmp_path / "RETOUCH")
    for path in sorted(root.rglob("*"), reverse=True):  # a shared, read-only dataset folder
        path.chmod(0o555 if path.is_dir() else 0o444)
    root.chmod(0o555)
    before = tree(root)
    config = ["--config", str(REPO / "hparams" / "retouch_unet.json"), "--data.init_args.root", str(root)]
    trainer = [*CPU_TRAINER, "--trainer.default_root_dir", str(tmp_path / "runs"), "--comet", "false"]

    out = run_octlightning(["check-data", *config]).stdout
    assert "RetouchDataModule" in out and "OK" in out
    # validation and test: one case of each vendor, 4 B-scans each
    assert "val: 12 samples" in out and "test: 12 samples" in out

    run_octlightning(["fit", *config, *trainer, "--trainer.max_steps", "1"])
    (ckpt,) = (tmp_path / "runs").rglob("last.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 1

    run_octlightning(["predict", *config, *trainer, "--ckpt_path", str(ckpt)])
    (written,) = (tmp_path / "runs").rglob("prediction.mhd")  # the case without reference only
    assert written.parent.name == "TEST029"
    source = sitk.ReadImage(str(root.joinpath(*TEST_CASE, "oct.mhd")))
    predicted = sitk.ReadImage(str(written))
    assert predicted.GetSize() == source.GetSize()
    assert predicted.GetSpacing() == pytest.approx(source.GetSpacing())
    # today's writer kept the spacing only: origin (0, 0, 0) and identity direction misplace the overlay
    assert predicted.GetOrigin() == pytest.approx(ORIGIN)
    assert predicted.GetDirection() == pytest.approx(DIRECTION)
    assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2, 3}
    assert tree(root) == before  # nothing written into the dataset folder
    assert any((tmp_path / "xdg" / "octlightning" / "retouch").iterdir())


def test_published_hparams_name_no_case_or_vendor_of_the_shared_sample():
    for name in ("retouch_unet.json", "retouch_adversarial.json"):
        data = json.loads((REPO / "hparams" / name).read_text())["data"]["init_args"]
        text = json.dumps(data)
        assert "DUKE" not in text and "vendor" not in data and "val_cases" not in data, name
