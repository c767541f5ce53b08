"""The sample every octlightning DataModule returns, declared once.

A sample is a plain ``dict`` (what ``default_collate`` batches and Lightning moves between devices);
:class:`Sample` names its keys, shapes, dtypes and units so that tasks, callbacks and new DataModules
agree on them. Batched, every tensor gains a leading batch dimension ``B`` and strings become lists.
Only ``image`` and ``id`` are always present; the others belong to the tasks that need them.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor


class Sample(TypedDict, total=False):
    """Keys of a sample (all optional but ``image`` and ``id``).

    Every sample:
        image: ``(C, H, W)`` float32, the network input, normalised (``C`` = the DataModule's
            ``in_channels``; ``H``, ``W`` in network-input pixels).
        id: ``str``, unique within its split: the file stem, ``<case>_<slice>`` or the B-scan index;
            result-table rows are named after it.
        stem: ``str``, the input file's name without extension, where it differs from ``id`` (DRIVE's
            ``01_test`` for id ``01``); prediction files are named after it (else after ``id``).
        size: ``(2,)`` int64, height and width of the image content before the batch was padded to a
            common size; pixels beyond it are padding that losses and metrics skip. For OCT layer
            samples (resized, not padded) it is the B-scan's height and width in the file, which
            boundary rows are scaled back to.
        file_size: ``(2,)`` int64, height and width of the image as stored on disk, present where the
            DataModule resized it to the network input (ISIC folders); predictions are written, and
            test scores computed, at this size.
        file_mask: ``(1, *file_size)`` uint8 class labels, the reference as stored on disk (test samples of
            DataModules that resize, ISIC folders): the test scores are computed against it. Batched, it
            stays a list of tensors (sizes differ).

    Segmentation:
        mask: ``(1, H, W)`` int64 class labels (0 = background; binary tasks: 0/1).
        fov: ``(1, H, W)`` uint8/float, 1 where pixels count (field of view, annotated region, the
            retina ROI); 0 pixels are excluded from losses and metrics.
        volume: ``str``, the volume (OCT scan, case) a B-scan belongs to: per-volume test scores.
        slice: ``int``, the B-scan's index in its volume (0-based).
        num_slices: ``int``, B-scans in the volume, to assemble predicted volumes.
        spacing: ``(3,)`` float64, voxel size in mm (x, y, z: MetaImage order) of the source volume.
        origin: ``(3,)`` float64, the volume's origin in mm (MetaImage ``Offset``), copied to predictions.
        direction: ``(9,)`` float64, the volume's direction cosines (row-major 3x3), copied to predictions.
        voxel_mm3: ``float``, the volume of one voxel in mm³ (fluid volumes in the per-volume table).
        centre: ``(2,)`` int64, row and column of a training patch's centre in its B-scan (patch sampling).

    Boundary regression:
        coords: ``(L, W_out)`` float32, rows of the ``L`` boundaries per output column, in
            network-input pixels; NaN where unannotated.
        valid: ``(L, W_out)`` bool, True where ``coords`` is annotated.
        spacing_um: ``()`` float32, axial micrometres per original pixel (NaN when unknown).
        subject: ``str``, the subject (eye/patient) of the B-scan: splits never share one.
    """

    image: Tensor
    id: str
    stem: str
    size: Tensor
    file_size: Tensor
    file_mask: Tensor
    mask: Tensor
    fov: Tensor
    volume: str
    slice: int
    num_slices: int
    spacing: Tensor
    origin: Tensor
    direction: Tensor
    voxel_mm3: float
    centre: Tensor
    coords: Tensor
    valid: Tensor
    spacing_um: Tensor
    subject: str
