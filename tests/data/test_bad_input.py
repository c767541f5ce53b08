"""Bad input, every DataModule: one table of corruptions (DataModule x case).

Each case writes a tiny valid dataset in the module's real on-disk format, applies one corruption and
runs :func:`octlightning.check_data.check_datamodule` (setup of every split, then every sample read once
in this process, as ``octlightning check-data`` and the start of ``fit`` do). It must end in a
:class:`DataError` whose message names the offending file (and, for HDF5, the dataset) and prints on
any terminal, never in a stray ``ValueError``/``UnicodeEncodeError`` from deep inside a library.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from octlightning.check_data import check_datamodule
from octlightning.check_data import main as check_data_main
from octlightning.cli import run_cli
from octlightning.conversion.h5_to_mirage import convert_h5
from octlightning.conversion.synthetic import write_drive_layout
from octlightning.data.fundus import FundusVesselDataModule
from octlightning.data.mask_folder import ISIC_TRAIN, MaskFolderDataModule
from octlightning.data.oct_layers import OCTLayerDataModule
from octlightning.data.oct_semseg import OCTSemSegDataModule
from octlightning.data.retouch import RetouchDataModule
from octlightning.errors import DataError
from tests.conftest import REPO, TINY_VESSEL
from tests.fixtures.isic import write_isic_layout
from tests.fixtures.oct_layers import H as LAYER_H
from tests.fixtures.oct_layers import L as LAYER_L
from tests.fixtures.oct_layers import N as LAYER_N
from tests.fixtures.oct_layers import W as LAYER_W
from tests.fixtures.oct_layers import write_layer_file, write_oct_h5
from tests.fixtures.retouch import synthetic_case, write_mhd

# A corruption gets the copy of the valid dataset and returns (root to load, extra DataModule
# arguments, substrings the error message must contain).
Corruption = Callable[[Path], tuple[Path, dict, list[str]]]


# --------------------------------------------------------------------------- corrupting files
def after(_action: object, expected: list[str]) -> list[str]:
    """``expected``, once ``_action`` (a call made for its effect on the files) has run."""
    return expected


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def save_sixteen_bit(path: Path, shape: tuple[int, int]) -> None:
    """A 16-bit grey image with values up to 4000, where an 8-bit one belongs."""
    Image.fromarray((np.arange(shape[0] * shape[1]).reshape(shape) % 4001).astype(np.uint16)).save(path)


def save_float_with_nan(path: Path, shape: tuple[int, int]) -> None:
    """A float32 TIFF of grey levels with one NaN and one inf pixel."""
    arr = np.full(shape, 100.0, np.float32)
    arr[1, 1], arr[2, 2] = np.nan, np.inf
    Image.fromarray(arr).save(path)


def save_stack(path: Path, shape: tuple[int, int], pages: int = 3) -> None:
    """A multi-page TIFF (a volume) where one 2-D image belongs."""
    frames = [Image.fromarray(np.full(shape, 60 * k, np.uint8)) for k in range(pages)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def non_utf8(name: bytes, folder: Path) -> tuple[Path, str]:
    """Path of a file in ``folder`` with a name that is not valid UTF-8, and how errors must show it."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name)), name.decode("utf-8", "backslashreplace")


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width


# --------------------------------------------------------------------------- fundus (DRIVE layout)
def write_fundus(root: Path) -> Path:
    return write_drive_layout(root, n_train=4, n_test=1, size=(32, 36), seed=0)


def fundus_dm(root: Path, **kw) -> FundusVesselDataModule:
    return FundusVesselDataModule(str(root), batch_size=2, num_workers=0, augment=False, **kw)


def _fundus(mutate: Callable[[Path], list[str]]) -> Corruption:
    return lambda root: (root, {}, mutate(root / "training"))


def _fundus_non_utf8(t: Path) -> list[str]:
    path, shown = non_utf8(b"25_training\xff.tif", t / "images")
    shutil.copy(t / "images" / "21_training.tif", path)
    return [shown]


def _fundus_duplicate(t: Path) -> list[str]:
    Image.open(t / "images" / "21_training.tif").save(t / "images" / "21_training.png")
    return ["21_training.tif", "21_training.png"]


FUNDUS: dict[str, Corruption] = {
    "truncated": _fundus(lambda t: after(truncate(t / "images" / "22_training.tif"), ["22_training.tif"])),
    "zero_byte": _fundus(lambda t: after((t / "1st_manual" / "23_manual1.gif").write_bytes(b""), ["23_manual1.gif"])),
    "missing_file": _fundus(lambda t: after((t / "mask" / "24_training_mask.gif").unlink(), ["24_training.tif"])),
    "wrong_dtype": _fundus(
        lambda t: after(save_sixteen_bit(t / "images" / "21_training.tif", (32, 36)), ["21_training.tif"])
    ),
    "wrong_rank": _fundus(lambda t: after(save_stack(t / "images" / "22_training.tif", (32, 36)), ["22_training.tif"])),
    "wrong_shape": _fundus(
        lambda t: after(
            Image.fromarray(np.zeros((10, 10), np.uint8)).save(t / "mask" / "22_training_mask.gif"),
            ["22_training_mask.gif", "22_training.tif"],
        )
    ),
    "nan_inf": _fundus(
        lambda t: after(save_float_with_nan(t / "images" / "23_training.tif", (32, 36)), ["23_training.tif"])
    ),
    "bad_labels": _fundus(
        lambda t: after(
            Image.fromarray((np.arange(32 * 36).reshape(32, 36) % 3 * 100).astype(np.uint8)).save(
                t / "1st_manual" / "21_manual1.gif"
            ),
            ["21_manual1.gif"],
        )
    ),
    "count_mismatch": _fundus(
        lambda t: after(
            shutil.copy(t / "1st_manual" / "21_manual1.gif", t / "1st_manual" / "30_manual1.gif"), ["30_manual1.gif"]
        )
    ),
    "duplicate_name": _fundus(_fundus_duplicate),
    "non_utf8_name": _fundus(_fundus_non_utf8),
}


# --------------------------------------------------------------------------- mask folder (ISIC layout)
def write_isic(root: Path) -> Path:
    return write_isic_layout(root)


def isic_dm(root: Path, **kw) -> MaskFolderDataModule:
    return MaskFolderDataModule(str(root), batch_size=2, num_workers=0, image_size=32, augment=False, **kw)


def _isic(mutate: Callable[[Path, Path], list[str]], **kw) -> Corruption:
    return lambda root: (root, kw, mutate(root / ISIC_TRAIN[0], root / ISIC_TRAIN[1]))


def _as_tiff(images: Path, victim: str, write: Callable[[Path, tuple[int, int]], None]) -> list[str]:
    """The same set with TIFF inputs (``image_glob="*.tif"``), one of them replaced by ``write``."""
    for jpg in sorted(images.glob("*.jpg")):
        Image.open(jpg).save(jpg.with_suffix(".tif"))
        jpg.unlink()
    path = images / f"{victim}.tif"
    write(path, size_of(path))
    return [path.name]


def _isic_non_utf8(images: Path, masks: Path) -> list[str]:
    image, shown = non_utf8(b"ISIC_bad\xff.jpg", images)
    mask, _ = non_utf8(b"ISIC_bad\xff_segmentation.png", masks)
    shutil.copy(images / "ISIC_0000001.jpg", image)
    shutil.copy(masks / "ISIC_0000001_segmentation.png", mask)
    return [shown.removesuffix(".jpg")]  # the image or its mask, whichever is scanned first


def _isic_duplicate(images: Path, masks: Path) -> list[str]:
    (images / "extra").mkdir()
    shutil.copy(images / "ISIC_0000001.jpg", images / "extra" / "ISIC_0000001.jpg")
    return ["extra/ISIC_0000001.jpg", "ISIC_0000001"]


def _isic_bad_labels(images: Path, masks: Path) -> list[str]:
    path = masks / "ISIC_0000002_segmentation.png"
    h, w = size_of(path)
    Image.fromarray((np.arange(h * w).reshape(h, w) % 3 * 100).astype(np.uint8)).save(path)
    return [path.name]


MASK_FOLDER: dict[str, Corruption] = {
    # Pixels are decoded in __getitem__ (the loader workers): found when the sample is read.
    "truncated": _isic(lambda i, m: after(truncate(i / "ISIC_0000004.jpg"), ["ISIC_0000004.jpg"])),
    "zero_byte": _isic(
        lambda i, m: after((m / "ISIC_0000002_segmentation.png").write_bytes(b""), ["ISIC_0000002_segmentation.png"])
    ),
    "missing_file": _isic(lambda i, m: after((m / "ISIC_0000003_segmentation.png").unlink(), ["ISIC_0000003.jpg"])),
    "wrong_dtype": _isic(lambda i, m: _as_tiff(i, "ISIC_0000001", save_sixteen_bit), image_glob="*.tif"),
    "wrong_rank": _isic(lambda i, m: _as_tiff(i, "ISIC_0000002", save_stack), image_glob="*.tif"),
    "wrong_shape": _isic(
        lambda i, m: after(
            Image.fromarray(np.zeros((10, 10), np.uint8)).save(m / "ISIC_0000001_segmentation.png"),
            ["ISIC_0000001_segmentation.png", "ISIC_0000001.jpg"],
        )
    ),
    "nan_inf": _isic(lambda i, m: _as_tiff(i, "ISIC_0000003", save_float_with_nan), image_glob="*.tif"),
    "bad_labels": _isic(_isic_bad_labels),
    "count_mismatch": _isic(
        lambda i, m: after(
            shutil.copy(m / "ISIC_0000001_segmentation.png", m / "ISIC_0000099_segmentation.png"),
            ["ISIC_0000099_segmentation.png"],
        )
    ),
    "duplicate_name": _isic(_isic_duplicate, image_glob="**/*.jpg"),
    "non_utf8_name": _isic(_isic_non_utf8),
}


# --------------------------------------------------------------------------- OCT layers (HDF5)
def write_layers(root: Path) -> Path:
    root.mkdir(parents=True)
    write_layer_file(root / "layers.h5")
    return root


def layers_dm(root: Path, **kw) -> OCTLayerDataModule:
    args = dict(batch_size=2, num_workers=0, layer_indices=[0, 2], image_size=[LAYER_H, LAYER_W])
    args.update(output_width=LAYER_W, val_fraction=1, test_fraction=1, augment=False)
    return OCTLayerDataModule(str(root), **(args | kw))


def _h5(mutate: Callable[[Path], list[str]]) -> Corruption:
    def corrupt(root: Path) -> tuple[Path, dict, list[str]]:
        expected = mutate(root / "layers.h5")
        (path,) = [p for p in root.iterdir() if p.suffix == ".h5"]  # renamed by the file-name cases
        return path, {}, expected

    return corrupt


def _h5_rewrite(key: str, **overrides) -> Corruption:
    return _h5(lambda p: after(write_layer_file(p, **overrides), ["layers.h5", f"'{key}'"]))


def _nan_bscan() -> np.ndarray:
    images = np.full((LAYER_N, LAYER_H, LAYER_W), 0.5, np.float32)
    images[7, 3, 3] = np.nan
    return images


def _h5_non_utf8(path: Path) -> list[str]:
    target, shown = non_utf8(b"layers\xff.h5", path.parent)
    path.rename(target)
    return [shown]


LAYER_SHAPE = (LAYER_N, LAYER_W, LAYER_L)
OCT_LAYERS: dict[str, Corruption] = {
    "truncated": _h5(lambda p: after(truncate(p), ["layers.h5"])),
    "zero_byte": _h5(lambda p: after(p.write_bytes(b""), ["layers.h5"])),
    "missing_key": _h5_rewrite("layer_maps", layer_maps=None),
    "wrong_dtype": _h5_rewrite("layer_maps", layer_maps=np.full(LAYER_SHAPE, b"ILM", "S3")),
    "wrong_rank": _h5_rewrite("images", images=np.zeros((LAYER_N, LAYER_H), np.uint8)),
    "wrong_shape": _h5_rewrite("layer_maps", layer_maps=np.full((LAYER_N, LAYER_L, LAYER_W), 10, np.float32)),
    # NaN pixels are found when the B-scan is read (one per sample); NaN rows mean "unannotated", inf is refused.
    "nan_inf": _h5_rewrite("images", images=_nan_bscan()),
    "nan_inf_labels": _h5_rewrite("layer_maps", layer_maps=np.full(LAYER_SHAPE, np.inf, np.float32)),
    "bad_labels": _h5_rewrite("layer_maps", layer_maps=np.full(LAYER_SHAPE, 500, np.float32)),
    "count_mismatch": _h5_rewrite("layer_maps", layer_maps=np.full((LAYER_N - 1, LAYER_W, LAYER_L), 10, np.float32)),
    "non_utf8_subject": _h5_rewrite("subject", subject=np.array([b"s\xff%d" % (i // 3) for i in range(LAYER_N)])),
    # One file holds everything, so there are no duplicate names; its own name is the user's choice.
    "non_utf8_name": _h5(_h5_non_utf8),
}
# Cases the DataModule handles instead of refusing (None: check-data passes, output printable).
HANDLED = {("oct_layers", "non_utf8_name")}


# --------------------------------------------------------------------------- RETOUCH (MetaImage volumes)
def write_retouch(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for k in (1, 2, 3):
        image, labels = synthetic_case(rng, sixteen_bit=False)
        write_mhd(image, root / f"TRAIN_Spectralis_00{k}" / "oct.mhd")
        write_mhd(labels, root / f"TRAIN_Spectralis_00{k}" / "reference.mhd")
    return root


def retouch_dm(root: Path, **kw) -> RetouchDataModule:
    args = dict(batch_size=4, num_workers=0, patch_size=[32, 32], val_fraction=0.34, test_fraction=0.0)
    args.update(augment=False, patches_per_epoch=4, cache_dir=str(root.parent / "cache"))
    return RetouchDataModule(str(root), **(args | kw))


def _case(mutate: Callable[[Path], list[str]]) -> Corruption:
    return lambda root: (root, {}, mutate(root / "TRAIN_Spectralis_002"))


def _volume(case: Path) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_case(np.random.default_rng(5), sixteen_bit=False)


def _vector_volume(case: Path) -> list[str]:
    image, _ = _volume(case)
    sitk.WriteImage(sitk.GetImageFromArray(np.repeat(image[..., None], 3, -1), isVector=True), str(case / "oct.mhd"))
    return ["TRAIN_Spectralis_002", "oct.mhd"]


def _nan_volume(case: Path) -> list[str]:
    image, _ = _volume(case)
    image = image.astype(np.float32)
    image[1, 10, 10] = np.nan
    write_mhd(image, case / "oct.mhd")
    return ["TRAIN_Spectralis_002", "oct.mhd"]


def _retouch_non_utf8(case: Path) -> list[str]:
    target, shown = non_utf8(b"TRAIN_Spectralis_\xff02", case.parent)
    case.rename(target)
    return [shown]


def _orphan_reference(case: Path) -> list[str]:
    (case.parent / "TRAIN_Spectralis_004").mkdir()
    shutil.copy(case / "reference.mhd", case.parent / "TRAIN_Spectralis_004")
    return ["TRAIN_Spectralis_004", "reference.mhd"]


def _duplicate_case(case: Path) -> list[str]:
    shutil.copytree(case, case.parent / "Spectralis-copy" / case.name)
    return ["Spectralis-copy/TRAIN_Spectralis_002"]


RETOUCH: dict[str, Corruption] = {
    "truncated": _case(lambda c: after((c / "oct.raw").write_bytes(b"\0" * 100), ["TRAIN_Spectralis_002", "oct.raw"])),
    "zero_byte": _case(
        lambda c: after((c / "reference.mhd").write_bytes(b""), ["TRAIN_Spectralis_002", "reference.mhd"])
    ),
    "missing_file": _case(lambda c: after((c / "oct.raw").unlink(), ["TRAIN_Spectralis_002", "oct.raw"])),
    "wrong_dtype": _case(_vector_volume),
    "wrong_rank": _case(
        lambda c: after(write_mhd(_volume(c)[0][0], c / "oct.mhd", (0.01, 0.004)), ["TRAIN_Spectralis_002", "oct.mhd"])
    ),
    "wrong_shape": _case(
        lambda c: after(
            write_mhd(_volume(c)[1][:, :, :40], c / "reference.mhd"), ["TRAIN_Spectralis_002", "reference.mhd"]
        )
    ),
    "nan_inf": _case(_nan_volume),
    "bad_labels": _case(
        lambda c: after(write_mhd(_volume(c)[1] * 2, c / "reference.mhd"), ["TRAIN_Spectralis_002", "reference.mhd"])
    ),
    "count_mismatch": _case(_orphan_reference),
    "duplicate_name": _case(_duplicate_case),
    "non_utf8_name": _case(_retouch_non_utf8),
}


# --------------------------------------------------------------------------- OCT class maps (MIRAGE layout)
def write_semseg(root: Path) -> Path:
    root.mkdir(parents=True)
    convert_h5(write_oct_h5(root / "oct.h5"), root / "dataset", val_fraction=0.2, test_fraction=0.2, seed=0)
    return root


def semseg_dm(root: Path, **kw) -> OCTSemSegDataModule:
    return OCTSemSegDataModule(str(root), batch_size=2, num_workers=0, augment=False, **kw)


def _semseg(mutate: Callable[[Path, Path], list[str]]) -> Corruption:
    def corrupt(root: Path) -> tuple[Path, dict, list[str]]:
        bscan = sorted((root / "dataset" / "train" / "bscan").glob("*.png"))[0]
        return root / "dataset", {}, mutate(bscan, bscan.parent.parent / "semseg" / bscan.name)

    return corrupt


def _replace_bscan(write: Callable[[Path, tuple[int, int]], None]) -> Corruption:
    def mutate(bscan: Path, mask: Path) -> list[str]:
        shape = size_of(bscan)
        bscan.unlink()
        write(bscan.with_suffix(".tif"), shape)
        return [bscan.with_suffix(".tif").name]

    return _semseg(mutate)


def _semseg_mask(values: int, shape: tuple[int, int] | None = None) -> Corruption:
    def mutate(bscan: Path, mask: Path) -> list[str]:
        Image.fromarray(np.full(shape or size_of(mask), values, np.uint8)).save(mask)
        return [mask.name]

    return _semseg(mutate)


def _semseg_non_utf8(bscan: Path, mask: Path) -> list[str]:
    image, shown = non_utf8(b"subject01\xff_010.png", bscan.parent)
    shutil.copy(bscan, image)
    shutil.copy(mask, non_utf8(b"subject01\xff_010.png", mask.parent)[0])
    return [shown]


OCT_SEMSEG: dict[str, Corruption] = {
    "truncated": _semseg(lambda b, m: after(truncate(b), [b.name])),
    "zero_byte": _semseg(lambda b, m: after(m.write_bytes(b""), [m.name])),
    "missing_file": _semseg(lambda b, m: after(m.unlink(), [b.name])),
    "wrong_dtype": _semseg(lambda b, m: after(save_sixteen_bit(b, size_of(b)), [b.name])),
    "wrong_rank": _replace_bscan(save_stack),
    "wrong_shape": _semseg_mask(0, (10, 10)),
    "nan_inf": _replace_bscan(save_float_with_nan),
    "bad_labels": _semseg_mask(7),
    "count_mismatch": _semseg(
        lambda b, m: after(shutil.copy(m, m.with_name("subject99_000.png")), ["subject99_000.png"])
    ),
    "duplicate_name": _semseg(lambda b, m: after(Image.open(b).save(b.with_suffix(".tif")), [b.name, b.stem + ".tif"])),
    "non_utf8_name": _semseg(_semseg_non_utf8),
}


# --------------------------------------------------------------------------- the table
MODULES: dict[str, tuple[Callable[[Path], Path], Callable[..., object], dict[str, Corruption]]] = {
    "fundus": (write_fundus, fundus_dm, FUNDUS),
    "mask_folder": (write_isic, isic_dm, MASK_FOLDER),
    "oct_layers": (write_layers, layers_dm, OCT_LAYERS),
    "retouch": (write_retouch, retouch_dm, RETOUCH),
    "oct_semseg": (write_semseg, semseg_dm, OCT_SEMSEG),
}
# The valid dataset as each module's corruptions locate it.
UNCHANGED: dict[str, Corruption] = {
    "fundus": _fundus(lambda t: []),
    "mask_folder": _isic(lambda i, m: []),
    "oct_layers": _h5(lambda p: []),
    "retouch": _case(lambda c: []),
    "oct_semseg": _semseg(lambda b, m: []),
}
TABLE = [
    pytest.param(module, case, id=f"{module}-{case}") for module, (_, _, cases) in MODULES.items() for case in cases
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Callable[[str], Path]:
    """One valid dataset per DataModule, written once; every case corrupts its own copy."""
    made: dict[str, Path] = {}

    def get(module: str) -> Path:
        if module not in made:
            made[module] = MODULES[module][0](tmp_path_factory.mktemp(module) / "data")
        return made[module]

    return get


def _copy(pristine: Callable[[str], Path], module: str, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(pristine(module), dst)
    return dst


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("module", list(MODULES))
def test_the_valid_fixture_passes_check_data(module, pristine, tmp_path):
    """The baseline every corruption starts from loads: each failure below is the corruption's."""
    load_root, kw, _ = UNCHANGED[module](_copy(pristine, module, tmp_path))
    lines = check_datamodule(MODULES[module][1](load_root, **kw))
    assert any(line.startswith("train: ") for line in lines) and any(line.startswith("val: ") for line in lines)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("module", "case"), TABLE)
def test_bad_input_is_a_data_error_naming_the_file(module, case, pristine, tmp_path):
    load_root, kw, expected = MODULES[module][2][case](_copy(pristine, module, tmp_path))
    dm = MODULES[module][1](load_root, **kw)
    if (module, case) in HANDLED:
        lines = check_datamodule(dm)
        "\n".join(lines).encode("utf-8")  # printable: no undecodable bytes leak into the summary
        return
    with pytest.raises(DataError) as err:
        check_datamodule(dm)
    message = str(err.value)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    message.encode("utf-8")  # never a surrogate from an undecodable file name: it prints anywhere


# --------------------------------------------------------------------------- fit and check-data commands
VESSEL = str(REPO / "hparams" / "vessel_unet.json")


@pytest.fixture
def broken_drive(pristine, tmp_path) -> Path:
    root = _copy(pristine, "fundus", tmp_path)
    truncate(root / "training" / "images" / "22_training.tif")
    return root


def test_fit_on_a_corrupted_set_stops_before_training_naming_the_file(broken_drive, tmp_path):
    runs = tmp_path / "runs"
    args = ["fit", "--config", VESSEL, "--data.init_args.root", str(broken_drive), *TINY_VESSEL]
    args += ["--trainer.default_root_dir", str(runs), "--comet", "false", "--trainer.max_epochs", "1"]
    with pytest.raises(DataError, match="22_training.tif"):
        run_cli(args)
    assert not list(runs.rglob("*.ckpt")) and not list(runs.rglob("metrics.csv"))


def test_check_data_command_prints_the_summary_or_the_broken_file(pristine, broken_drive, tmp_path, capsys):
    good = _copy(pristine, "fundus", tmp_path / "good")
    assert check_data_main(["--config", VESSEL, "--data.init_args.root", str(good), *TINY_VESSEL]) == 0
    out = capsys.readouterr().out
    assert "FundusVesselDataModule" in out and "OK" in out
    assert "train: 3 samples" in out and "val: 1 samples" in out and "test: 1 samples" in out
    mask_line = next(line for line in out.splitlines() if line.strip().startswith("mask"))
    assert "values [0.0, 1.0]" in mask_line
    # what the model is given from the data, as fit links it: one vessel channel, RGB input
    model = out.split("model gets:")[1].split()
    assert model[model.index("in_channels") + 1] == "3" and model[model.index("num_classes") + 1] == "1"
    assert "class_names" in model and "vessel" in out.split("model gets:")[1]

    assert check_data_main(["--config", VESSEL, "--data.init_args.root", str(broken_drive), *TINY_VESSEL]) == 1
    captured = capsys.readouterr()
    assert "check-data: FAILED:" in captured.err and "22_training.tif" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_fit_reports_an_image_broken_inside_a_loader_worker_in_one_line(tmp_path):
    """ISIC pixels are decoded lazily in workers; the command still ends with one line naming the file."""
    import subprocess
    import sys

    root = write_isic_layout(tmp_path / "isic")
    broken = sorted((root / ISIC_TRAIN[0]).glob("*.jpg"))[0]
    truncate(broken)
    proc = subprocess.run(
        [sys.executable, "-m", "octlightning", "fit", "--config", str(REPO / "hparams" / "isic_deeplabv3plus.json"),
         "--data.init_args.root", str(root), "--data.init_args.num_workers", "1", "--data.init_args.batch_size", "2",
         "--data.init_args.image_size", "[32, 32]", "--model.init_args.net.init_args.encoder_name", "resnet18",
         "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--comet", "false",
         "--trainer.default_root_dir", str(tmp_path / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"octlightning: data error: {broken}" in proc.stderr
    assert "Traceback" not in proc.stderr
