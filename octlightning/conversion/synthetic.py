"""Small synthetic datasets in the real on-disk layouts, for the demo and the tests.

They let ``make demo`` run on a machine without the shared data, and let every DataModule be tested
on files written exactly as the public datasets ship them. They are not for judging models.

``python -m octlightning.convert synthetic drive <folder>`` (or ``octlightning convert ...``) writes a
DRIVE-layout set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def _draw_vessels(rng: np.random.Generator, h: int, w: int, n: int = 6) -> np.ndarray:
    """Random smooth curves, 1-3 px wide, branching from near the optic disc."""
    mask = np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.2, 0.35)
    for _ in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        y, x = cy, cx
        width = rng.uniform(0.8, 2.0)
        for _ in range(int(max(h, w) * 0.8)):
            angle += rng.normal(0, 0.08)
            y, x = y + np.sin(angle), x + np.cos(angle)
            if not (0 <= y < h and 0 <= x < w):
                break
            y0, y1 = int(max(0, y - 3)), int(min(h, y + 4))
            x0, x1 = int(max(0, x - 3)), int(min(w, x + 4))
            sub = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= width**2
            mask[y0:y1, x0:x1] |= sub
    return mask


def synthetic_fundus(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB image uint8, vessel mask {0,255}, FOV mask {0,255}) of a fundus-like picture."""
    yy, xx = np.mgrid[0:h, 0:w]
    fov = ((yy - h / 2) / (h * 0.47)) ** 2 + ((xx - w / 2) / (w * 0.47)) ** 2 <= 1
    vessels = _draw_vessels(rng, h, w) & fov
    base = np.stack([np.full((h, w), 170.0), np.full((h, w), 90.0), np.full((h, w), 40.0)], -1)
    base += rng.normal(0, 6, base.shape)
    base[vessels] *= 0.55
    image = np.where(fov[..., None], base, 0).clip(0, 255).astype(np.uint8)
    return image, vessels.astype(np.uint8) * 255, fov.astype(np.uint8) * 255


def write_drive_layout(
    root: str | Path, n_train: int = 6, n_test: int = 2, size: tuple[int, int] = (96, 100), seed: int = 0
) -> Path:
    """Write a DRIVE-layout folder: ``training/`` (ids 21..) and ``test/`` (ids 01..), tif + gif."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    for split, ids in (("training", range(21, 21 + n_train)), ("test", range(1, 1 + n_test))):
        for sub in ("images", "1st_manual", "mask"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            image, vessels, fov = synthetic_fundus(rng, h, w)
            Image.fromarray(image).save(root / split / "images" / f"{i:02d}_{split}.tif", compression="tiff_lzw")
            Image.fromarray(vessels).save(root / split / "1st_manual" / f"{i:02d}_manual1.gif")
            Image.fromarray(fov).save(root / split / "mask" / f"{i:02d}_{split}_mask.gif")
    return root


HELP = "write a small synthetic dataset in a public layout (demo and tests; not for judging models)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of :func:`run`."""
    parser.add_argument("layout", choices=["drive"], help="the on-disk layout to write")
    parser.add_argument("folder", help="output dataset folder")
    parser.add_argument("--n-train", type=int, default=12, help="training images")
    parser.add_argument("--n-test", type=int, default=4, help="test images")
    parser.add_argument("--size", type=int, nargs=2, default=(192, 200), metavar=("H", "W"), help="image size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")


def run(args: argparse.Namespace) -> int:
    """Write the dataset the parsed ``args`` describe. Returns the exit status."""
    path = write_drive_layout(args.folder, args.n_train, args.n_test, tuple(args.size), args.seed)
    print(f"wrote a synthetic DRIVE-layout dataset to {path}")
    return 0
