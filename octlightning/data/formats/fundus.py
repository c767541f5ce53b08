"""The fundus vessel layouts as published: DRIVE, CHASE_DB1, the Kaggle retina-blood-vessel set, and plain
image/mask folders; which one a folder holds, and where each image's vessel mask and FOV mask are.

Only read here: octlightning writes no fundus data (``tests/fixtures/fundus.py`` writes each layout for
the tests). Decoding the files is :func:`octlightning.data.fundus.load_fundus_records`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from octlightning.data.io import check_pairs, list_images, require_dir, require_utf8_name, unique_index
from octlightning.errors import DataError

Layout = Literal["drive", "chase", "kaggle", "folder"]
LAYOUTS = ("drive", "chase", "kaggle", "folder")
# Masks of the Kaggle retina-blood-vessel set were resized with interpolation: 8-bit grey with grey
# vessel edges. Grey levels above 127 (the midpoint) are vessel unless mask_threshold says otherwise;
# the other layouts ship strictly two-valued masks and are read as such.
LAYOUT_MASK_THRESHOLD: dict[str, int | None] = {"kaggle": 127}
CHASE_NAME = re.compile(r"Image_(\d+)([LR])")


def _leading_number(path: Path) -> str:
    m = re.match(r"(\d+)", path.name)
    if not m:
        raise DataError(f"{path}: DRIVE file names start with the image number (e.g. 21_training.tif)")
    return m.group(1)


def _kaggle_base(root: Path) -> Path | None:
    """The folder holding ``train/image`` of a Kaggle retina-blood-vessel set: ``root/Data`` or ``root``."""
    for base in (root / "Data", root):
        if (base / "train" / "image").is_dir():
            return base
    return None


def detect_layout(root: Path) -> Layout:
    """Which fundus layout ``root`` holds, from its folder and file names.

    ``drive``: ``training/images``; ``kaggle``: ``Data/train/image`` (or ``train/image``); ``chase``:
    ``Image_NNL_1stHO.png`` files; ``folder``: ``images/`` and ``masks/``. Raises :class:`DataError`
    naming ``root`` and every layout looked for when none matches.
    """
    require_dir(root, "fundus dataset")
    if (root / "training" / "images").is_dir():
        return "drive"
    if _kaggle_base(root) is not None:
        return "kaggle"
    if any(root.glob("Image_*_1stHO.png")):
        return "chase"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    raise DataError(
        f"{root}: no fundus layout recognised; expected DRIVE (training/images, training/1st_manual, "
        f"training/mask), CHASE_DB1 (Image_NNL.jpg + Image_NNL_1stHO.png), Kaggle retina-blood-vessel "
        f"(Data/train/image + Data/train/mask) or images/ + masks/ [+ fov/]; set layout to one of {list(LAYOUTS)}"
    )


def _image_mask_folders(base: Path, image_dir: str, mask_dir: str, fov_dir: str | None, what: str):
    """``(id, image, mask, fov)`` of a folder pair matched by file stem (Kaggle, plain folders)."""
    images = unique_index(list_images(require_dir(base / image_dir, f"{what} images")), what="image")
    masks = unique_index(list_images(require_dir(base / mask_dir, f"{what} masks")), what="mask")
    check_pairs(images, masks)
    fovs = {}
    if fov_dir is not None and (base / fov_dir).is_dir():
        fovs = unique_index(list_images(base / fov_dir), what="FOV mask")
        check_pairs(images, fovs, "FOV mask")
    return [(k, images[k], masks[k], fovs.get(k)) for k in sorted(images)]


def scan_fundus_files(
    root: Path, layout: Layout, split: Literal["train", "test"]
) -> list[tuple[str, Path, Path | None, Path | None]]:
    """Find ``(id, image, vessel mask, fov mask)`` paths for a split; checks that pairs are complete."""
    if layout == "drive":
        folder = require_dir(root / ("training" if split == "train" else "test"), f"DRIVE {split}")
        images = unique_index(list_images(require_dir(folder / "images", "DRIVE images")), _leading_number, "image")
        manual_dir = folder / "1st_manual"
        if manual_dir.is_dir():
            masks = unique_index(list_images(manual_dir), _leading_number, "vessel mask")
            check_pairs(images, masks, "vessel mask (1st_manual/NN_manual1.gif)")
        elif split == "train":
            raise DataError(f"{manual_dir}: DRIVE training folder has no 1st_manual vessel masks")
        else:
            masks = {}
        fov_dir = require_dir(folder / "mask", "DRIVE field-of-view mask")
        fovs = unique_index(list_images(fov_dir), _leading_number, "FOV mask")
        check_pairs(images, fovs, "FOV mask (mask/NN_<split>_mask.gif)")
        return [(k, images[k], masks.get(k), fovs[k]) for k in sorted(images)]
    if layout == "chase":
        require_dir(root, "CHASE_DB1")
        images = unique_index((p for p in list_images(root, (".jpg",)) if p.stem.startswith("Image_")), what="image")
        masks = {p.stem.removesuffix("_1stHO"): require_utf8_name(p) for p in root.glob("Image_*_1stHO.png")}
        if not images:
            raise DataError(f"{root}: no CHASE_DB1 images (Image_NNX.jpg) found")
        check_pairs(images, masks, "1st-observer mask (Image_NNX_1stHO.png)")
        # The usual CHASE_DB1 protocol: children 1-10 (20 images) train, 11-14 (8 images) test.
        keep = [k for k in sorted(images) if (int(chase_child(images[k])) <= 10) == (split == "train")]
        return [(k, images[k], masks[k], None) for k in keep]
    if layout == "kaggle":
        base = _kaggle_base(root)
        if base is None:
            raise DataError(f"{root}: no Kaggle retina-blood-vessel training folder (Data/train/image) found")
        if split == "test" and not (base / "test").is_dir():
            raise DataError(f"{base / 'test'}: no test folder (expected test/image and test/mask)")
        # No FOV masks are shipped: the FOV is derived from each image.
        return _image_mask_folders(base / split, "image", "mask", None, f"Kaggle {split}")
    if layout == "folder":
        base = root if split == "train" else root / "test"
        if split == "test" and not base.is_dir():
            raise DataError(f"{base}: no test folder (expected test/images and test/masks)")
        return _image_mask_folders(base, "images", "masks", "fov", "")
    raise ValueError(f"unknown fundus layout {layout!r}; choose one of {list(LAYOUTS)} or null (detect)")


def chase_child(path: Path) -> str:
    """The child of a CHASE_DB1 image (``Image_05L.jpg`` and ``Image_05R.jpg``: child ``05``)."""
    m = CHASE_NAME.match(path.name)
    if not m:
        raise DataError(f"{path}: CHASE_DB1 image names are Image_<child><L|R>.jpg (e.g. Image_01L.jpg)")
    return m.group(1)


def labelled_fundus_files(root: Path, layout: Layout) -> list[tuple[str, Path, Path | None, Path | None]]:
    """Every image of a dataset that has a vessel mask: its training part and its test part (when the
    layout has one and it is annotated), for testing on a whole held-out dataset (``test_dir``). Where
    the two parts use the same ids (Kaggle: both numbered from 0), ids become ``train_<id>``/``test_<id>``."""
    files = scan_fundus_files(root, layout, "train")
    kaggle = _kaggle_base(root)
    has_test = {
        "drive": (root / "test").is_dir(),
        "chase": True,
        "kaggle": kaggle is not None and (kaggle / "test").is_dir(),
        "folder": (root / "test").is_dir(),
    }[layout]
    test = scan_fundus_files(root, layout, "test") if has_test else []
    if {f[0] for f in files} & {f[0] for f in test}:
        # The Kaggle set numbers both parts from 0 (train/image/0.png, test/image/0.png): every id then
        # names its part, so that each image keeps a row of its own.
        files = [(f"train_{k}", image, mask, fov) for k, image, mask, fov in files]
        test = [(f"test_{k}", image, mask, fov) for k, image, mask, fov in test]
    return files + [f for f in test if f[2] is not None]
