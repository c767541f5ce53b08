"""RETOUCH datasets over a preprocessed cache: whole B-scans (validation, test, predict) and training
patches centred on ROI pixels with a fixed share holding fluid.

Whole-B-scan samples carry ``id`` ``<case>_<slice>``, ``volume`` ``<case>``, ``slice``, ``num_slices``,
``voxel_mm3`` and the source volume's geometry (``spacing``, ``origin`` in mm and ``direction``, ITK order
``x, y, z``), so that per-volume scores (absolute volume difference in mm^3) and ``.mhd`` label volumes
that overlay the scan (:class:`~octlightning.callbacks.WriteVolumes`) can be produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from octlightning.data.base import SampleCache, cached
from octlightning.data.retouch.cases import FLUIDS
from octlightning.data.retouch.preprocess import VolumeStore
from octlightning.data.transforms import SeededTransform
from octlightning.errors import DataError


class RetouchSliceDataset(Dataset):
    """Whole B-scans -> dict(image (C,H,W) float32 standardised, [mask (1,H,W) float32 labels 0..3],
    size (H, W), id, volume, slice, num_slices, spacing (3,) mm, origin (3,) mm, direction (9,),
    voxel_mm3); ``C`` = ``in_channels`` (the grey B-scan repeated)."""

    def __init__(self, store: VolumeStore, cases: Sequence[str], in_channels: int = 1) -> None:
        self.store = store
        self.in_channels = in_channels
        self.items = [(c, z) for c in cases for z in range(store.cases[c].shape[0])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case, z = self.items[index]
        info = self.store.cases[case]
        image = np.asarray(self.store.array(case, "oct")[z])
        sample: dict[str, Any] = {
            "image": self.store.normalised(case, image).repeat(self.in_channels, 1, 1),
            "size": torch.tensor(image.shape),
            "id": f"{case}_{z:03d}",
            "volume": case,
            "slice": z,
            "num_slices": info.shape[0],
            "spacing": torch.tensor(info.spacing, dtype=torch.float64),
            "origin": torch.tensor(info.origin, dtype=torch.float64),
            "direction": torch.tensor(info.direction, dtype=torch.float64),
            "voxel_mm3": info.voxel_mm3,
        }
        if info.labelled:
            labels = np.asarray(self.store.array(case, "reference")[z])
            sample["mask"] = torch.from_numpy(labels.astype(np.float32)).unsqueeze(0)
        return sample


def fluid_window_counts(fluid: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """For every pixel, the number of fluid pixels in the ``patch`` centred on it (clipped at borders)."""
    ph, pw = patch
    h, w = fluid.shape
    s = np.zeros((h + 1, w + 1), dtype=np.int64)
    s[1:, 1:] = np.cumsum(np.cumsum(fluid, 0), 1)
    r0 = np.clip(np.arange(h) - ph // 2, 0, h)[:, None]
    r1 = np.clip(np.arange(h) - ph // 2 + ph, 0, h)[:, None]
    c0 = np.clip(np.arange(w) - pw // 2, 0, w)[None, :]
    c1 = np.clip(np.arange(w) - pw // 2 + pw, 0, w)[None, :]
    return s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]


def crop_centred(array: np.ndarray, cy: int, cx: int, patch: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``patch`` centred on ``(cy, cx)``, zero outside the image, and its inside-the-image mask."""
    ph, pw = patch
    h, w = array.shape
    y0, x0 = cy - ph // 2, cx - pw // 2
    out = np.zeros((ph, pw), dtype=array.dtype)
    inside = np.zeros((ph, pw), dtype=np.uint8)
    sy0, sy1, sx0, sx1 = max(0, y0), min(h, y0 + ph), max(0, x0), min(w, x0 + pw)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[sy0:sy1, sx0:sx1]
    inside[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = 1
    return out, inside


class RetouchPatchDataset(Dataset):
    """Training patches centred on ROI pixels, with a fixed share of patches holding fluid.

    Item ``i`` is a positive (centred on a fluid pixel) when ``i < round(positive_fraction * length)``,
    else a negative (no fluid anywhere in the patch); the shuffling sampler mixes them. Where the patch
    lies is drawn at every access from the loader's torch RNG (seeded per worker by Lightning), so each
    epoch sees new patches and runs repeat under the same seed. Samples carry ``fov`` (1 inside the
    B-scan, 0 where the patch overhangs it) and ``centre`` ``(row, column)`` in the B-scan.

    Args:
        balance_fluids: choose the fluid class of a positive patch uniformly among the classes present,
            then a B-scan holding it, so rare classes (PED, SRF) are seen as often as IRF.
        cache: keeps each B-scan's candidate centres (see :meth:`centres`).
        in_channels: the grey patch repeated to this many channels (3 for RGB-pretrained encoders).
    """

    def __init__(
        self,
        store: VolumeStore,
        cases: Sequence[str],
        patch_size: Sequence[int],
        positive_fraction: float,
        length: int,
        transform: SeededTransform | None = None,
        balance_fluids: bool = True,
        cache: SampleCache | None = None,
        in_channels: int = 1,
    ) -> None:
        if not 0 <= positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.store = store
        self.patch = (int(patch_size[0]), int(patch_size[1]))
        self.length = length
        self.n_positive = round(positive_fraction * length)
        self.transform = transform
        self.balance_fluids = balance_fluids
        self.cache = cache
        self.in_channels = in_channels
        wanted = set(cases)
        rows = [r for r in store.index() if r["case"] in wanted]
        self.slices = [(r["case"], int(r["slice"])) for r in rows]
        # B-scans holding each fluid class (1..3), and any fluid (0)
        self.with_fluid: dict[int, list[tuple[str, int]]] = {
            k: [(r["case"], int(r["slice"])) for r in rows if r[f] == "1"] for k, f in enumerate(FLUIDS, start=1)
        }
        self.with_fluid[0] = [(r["case"], int(r["slice"])) for r in rows if "1" in (r["IRF"], r["SRF"], r["PED"])]
        self.classes = [k for k in (1, 2, 3) if self.with_fluid[k]]
        if self.n_positive and not self.with_fluid[0]:
            raise DataError(
                f"positive_fraction {positive_fraction} but the training cases {sorted(wanted)} hold no fluid"
            )

    def __len__(self) -> int:
        return self.length

    def describe(self) -> str:
        """What one epoch's samples are (``check-data`` prints it beside the sample count)."""
        cases = sorted({case for case, _ in self.slices})
        return (
            f"random {self.patch[0]}x{self.patch[1]} patches, drawn anew every epoch from {len(cases)} cases "
            f"({len(self.slices)} B-scans), {self.n_positive} centred on fluid"
        )

    def centres(self, case: str, z: int, k: int | None) -> np.ndarray:
        """Flat indices of the pixels a patch may be centred on in B-scan ``z`` of ``case``: pixels of
        fluid class ``k`` (0: any fluid), or for ``k=None`` retina (ROI) pixels whose patch holds no fluid.

        Finding them scans the whole B-scan, many times the cost of cutting the patch, so they are kept
        in ``cache`` (when given) and every later patch from this B-scan is a draw from the list.
        """

        def find() -> np.ndarray:
            labels = np.asarray(self.store.array(case, "reference")[z])
            if k is not None:
                return np.flatnonzero(labels == k if k else labels > 0).astype(np.int32)
            allowed = np.asarray(self.store.array(case, "roi")[z]) > 0
            if labels.any():
                allowed &= fluid_window_counts(labels > 0, self.patch) == 0
            return np.flatnonzero(allowed).astype(np.int32)

        return cached(self.cache, ("centres", case, z, k, self.patch), find)

    def locate(self, index: int, rng: np.random.Generator) -> tuple[str, int, int, int]:
        """``(case, slice, row, column)`` of the centre of patch ``index``."""
        if index < self.n_positive:
            k = int(rng.choice(self.classes)) if self.balance_fluids else 0
            case, z = self.with_fluid[k][rng.integers(len(self.with_fluid[k]))]
            candidates = self.centres(case, z, k)
        else:
            for _ in range(100):
                case, z = self.slices[rng.integers(len(self.slices))]
                candidates = self.centres(case, z, None)
                if len(candidates):
                    break
            else:
                raise DataError(
                    f"no fluid-free {self.patch[0]}x{self.patch[1]} patch centred in the retina found in 100 "
                    f"random training B-scans; lower patch_size or raise positive_fraction"
                )
        width = self.store.array(case, "reference").shape[-1]
        y, x = divmod(int(candidates[rng.integers(len(candidates))]), width)
        return case, z, y, x

    def __getitem__(self, index: int) -> dict[str, Any]:
        # One torch draw per access: follows seed_everything / the worker seed, differs every epoch.
        rng = np.random.default_rng([index, int(torch.randint(0, 2**31 - 1, ()).item())])
        case, z, cy, cx = self.locate(index, rng)
        image, fov = crop_centred(np.asarray(self.store.array(case, "oct")[z]), cy, cx, self.patch)
        labels, _ = crop_centred(np.asarray(self.store.array(case, "reference")[z]), cy, cx, self.patch)
        if self.transform is not None:
            out = self.transform(image=image, mask=labels, fov=fov)
            image, labels, fov = out["image"], out["mask"], out["fov"]
        tensor = self.store.normalised(case, image)
        fov_t = torch.from_numpy(np.ascontiguousarray(fov, dtype=np.float32)).unsqueeze(0)
        # outside the B-scan: 0, like the padding of whole B-scans
        return {
            "image": (tensor * fov_t).repeat(self.in_channels, 1, 1),
            "mask": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)).unsqueeze(0),
            "fov": fov_t,
            "id": f"{case}_{z:03d}",
            "centre": torch.tensor([cy, cx]),
        }
