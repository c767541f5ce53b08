"""Reading image files with errors that name the file and say what is wrong."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from octlightning.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm")
# EXIF orientations (tag 0x0112) that turn the stored picture by 90 degrees: width and height swap.
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# PIL modes holding more than 8 bits per pixel: converting them to "L"/"RGB" clips (16-bit) or
# zeroes (NaN) values without a word, so they are checked first.
WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def shown_path(path: str | os.PathLike) -> str:
    """The path as printable text: bytes that are not UTF-8 appear as ``\\xNN`` (never a surrogate)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def require_utf8_name(path: Path) -> Path:
    """Refuse a file name that is not valid UTF-8: ids, logs and result tables made from it cannot be written."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{shown_path(path)}: the file name is not valid UTF-8 (undecodable bytes shown as \\xNN); rename the file"
        ) from None
    return path


def load_image(path: Path, what: str = "image") -> Image.Image:
    """Open and decode one image file, refusing empty, unreadable, multi-page and NaN/inf files.

    The EXIF orientation (cameras and phones store the sensor's pixels and a tag saying how to turn
    them) is applied, as every image viewer and the annotation tools do, so an image and a mask drawn
    on it stay registered whichever of them carries the tag.
    """
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the {what} file is empty (0 bytes)")
        with Image.open(path) as im:
            # A TIFF/GIF/PNG stack where one 2-D picture belongs (e.g. a whole OCT volume): PIL would
            # silently give its first page. MPO is a JPEG with embedded previews, one picture.
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and im.format != "MPO":
                raise DataError(f"{path}: the {what} file holds {frames} pages/frames; expected one 2-D image")
            im.load()
            im = ImageOps.exif_transpose(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot decode the {what} ({err}); the file is truncated or not an image") from err
    if im.mode == "F":
        arr = np.asarray(im)
        bad = ~np.isfinite(arr)
        if bad.any():
            raise DataError(f"{path}: the {what} holds {int(bad.sum())} NaN/inf pixel values ({bad.mean():.1%})")
    return im


def read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """Decode an image file to a uint8 array in PIL ``mode`` (``"RGB"`` or ``"L"``).

    16-bit and floating-point files are accepted only when every value is an integer in 0..255;
    anything else would be clipped or truncated, so it is an error naming the file.
    """
    im = load_image(path)
    if im.mode in WIDE_MODES:
        arr = np.asarray(im)
        low, high = float(arr.min()), float(arr.max())
        if low < 0 or high > 255 or not np.array_equal(arr, np.round(arr)):
            raise DataError(
                f"{path}: {arr.dtype} image ({im.mode}) with values {low:g}..{high:g}; expected 8-bit "
                f"grey levels 0..255 (convert it to 8 bit, choosing the intensity window yourself)"
            )
        im = Image.fromarray(arr.astype(np.uint8))
    return np.asarray(im.convert(mode))


def oriented_size(path: Path, what: str = "image") -> tuple[int, int]:
    """``(height, width)`` as displayed (EXIF orientation applied), from the header alone."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the {what} file is empty (0 bytes)")
        with Image.open(path) as im:
            turned = im.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS
            return (im.width, im.height) if turned else (im.height, im.width)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read the {what} ({err}); the file is truncated or not an image") from err


def read_binary_mask(path: Path) -> np.ndarray:
    """Read a two-valued mask (0/255, 0/1, 1-bit, palette or grayscale) as uint8 {0, 1}.

    Anything with more than two grey values is refused instead of guessed at; the error names the
    ``mask_threshold`` option, which binarises lossy (JPEG) or anti-aliased masks instead.
    """
    im = load_image(path, "mask")
    if im.mode not in ("1", "L", "I", "I;16"):
        im = im.convert("L")
    arr = np.asarray(im)
    values = np.unique(arr)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = values[:8].tolist()
        raise DataError(
            f"{path}: mask is not binary, it has {len(values)} values {shown}{'...' if len(values) > 8 else ''}; "
            f"expected background 0 and one foreground value (1 or 255); for a lossy (JPEG) or anti-aliased "
            f"mask set the DataModule's mask_threshold (e.g. 127: grey levels above it are foreground)"
        )
    return (arr > 0).astype(np.uint8)


def read_mask(path: Path, threshold: int | None = None) -> np.ndarray:
    """uint8 ``(H, W)`` {0, 1} mask: strictly two-valued files by default (:func:`read_binary_mask`),
    ``grey level > threshold`` for lossy (JPEG) or anti-aliased masks."""
    if threshold is None:
        return read_binary_mask(path)
    return (read_image(path, "L") > threshold).astype(np.uint8)


def list_images(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files in a folder, sorted by name; hidden files skipped."""
    suffixes = tuple(s.lower() for s in suffixes)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))
    return [require_utf8_name(p) for p in paths]


def unique_index(
    paths: Iterable[Path], key: Callable[[Path], str] = lambda p: p.stem, what: str = "file"
) -> dict[str, Path]:
    """``{id: path}``, failing when two files give one id (``a.png`` and ``a.jpg``): one would be lost."""
    index: dict[str, Path] = {}
    for path in paths:
        k = key(path)
        if k in index:
            raise DataError(
                f"{index[k]} and {path}: two {what}s with the id {k!r}; ids must be unique (remove or rename one)"
            )
        index[k] = path
    return index


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
