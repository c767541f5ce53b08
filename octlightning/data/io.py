"""Reading image files with errors that name the file and say what is wrong."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from octlightning.data.base import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm")


def read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """Decode an image file to a uint8 array in PIL ``mode`` (``"RGB"`` or ``"L"``)."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty (0 bytes)")
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert(mode))
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode the image ({err}); the file is truncated or not an image") from err


def read_binary_mask(path: Path) -> np.ndarray:
    """Read a two-valued mask (0/255, 0/1, 1-bit, palette or grayscale) as uint8 {0, 1}.

    Anything with more than two grey values is refused instead of guessed at.
    """
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the mask file is empty (0 bytes)")
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("L")
            elif im.mode not in ("1", "L", "I", "I;16"):
                im = im.convert("L")
            arr = np.asarray(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode the mask ({err})") from err
    values = np.unique(arr)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = values[:8].tolist()
        raise DataError(
            f"{path}: mask is not binary, it has {len(values)} values {shown}{'...' if len(values) > 8 else ''}; "
            f"expected background 0 and one foreground value (1 or 255)"
        )
    return (arr > 0).astype(np.uint8)


def list_images(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files in a folder, sorted by name; hidden files skipped."""
    suffixes = tuple(s.lower() for s in suffixes)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def check_pairs(images: dict[str, Path], masks: dict[str, Path], what: str = "mask") -> None:
    """Fail when an image has no mask or a mask no image, listing the offending files."""
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(f"images without a {what}: " + ", ".join(str(images[k]) for k in no_mask[:10]))
    if no_image:
        problems.append(f"{what}s without an image: " + ", ".join(str(masks[k]) for k in no_image[:10]))
    if problems:
        raise DataError("; ".join(problems) + f" (every image needs exactly one {what} with the matching name)")
