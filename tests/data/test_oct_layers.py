"""OCT layer-boundary regression: HDF5 DataModule, coordinate geometry, masked losses/metrics, CLI."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from octlightning.cli import run_cli
from octlightning.data.coords import interpolate_gaps, resample_columns, rescale_rows
from octlightning.data.oct_layers import OCTLayerDataModule
from octlightning.data.transforms import LayerAugmentation, SeededTransform
from octlightning.errors import ConfigError, DataError
from octlightning.losses import row_cross_entropy
from octlightning.metrics import BoundaryError
from octlightning.models.boundary_head import order_boundaries, soft_argmax_rows
from octlightning.models.layer_regression import SegFormerLayerRegressor, UNetLayerRegressor
from octlightning.tasks.layer_regression import LayerRegressionTask
from tests.conftest import CPU_TRAINER, REPO, shared
from tests.fixtures.oct_layers import EMPTY, H, L, N, W, boundary_rows, write_layer_file

TINY_SEGFORMER = '{"hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 1, 1]}'






@pytest.fixture(scope="module")
def h5file(tmp_path_factory) -> Path:
    return write_layer_file(tmp_path_factory.mktemp("oct") / "layers.h5")


def _dm(root, **kw) -> OCTLayerDataModule:
    args = {"batch_size": 2, "num_workers": 0, "layer_indices": [0, 2], "image_size": [H, W], "output_width": W}
    args.update({"val_fraction": 1, "test_fraction": 1})  # one subject each
    args.update(kw)
    return OCTLayerDataModule(str(root), **args)


# ----------------------------------------------------------------------------- coordinate geometry
def test_column_resampling_is_exact_for_lines_and_round_trips():
    y = 3.0 + 0.5 * np.arange(40.0)
    down, valid = resample_columns(y, 32)
    assert valid.all()
    pos = (np.arange(32) + 0.5) * 40 / 32 - 0.5  # resize convention: column centres
    np.testing.assert_allclose(down, 3.0 + 0.5 * pos)
    back, _ = resample_columns(down, 40)
    np.testing.assert_allclose(back[1:-1], y[1:-1], atol=1e-9)  # edge columns are clamped, as resize does


def test_resampling_never_leaks_nan_and_marks_bridging_columns_invalid():
    y = np.arange(10.0)
    y[4] = np.nan
    out, valid = resample_columns(y, 20)
    assert np.isnan(out[~valid]).all() and np.isfinite(out[valid]).all()
    pos = (np.arange(20) + 0.5) * 10 / 20 - 0.5
    touches_gap = (np.floor(pos) == 4) | ((np.floor(pos) == 3) & (pos > 3))
    assert (~valid == touches_gap).all()


def test_row_scaling_matches_cv2_resize():
    """A bright row at y lands, after resizing the image, at rescale_rows(y): both use pixel centres."""
    for y0, src, dst in [(10, 48, 96), (30, 48, 64), (7, 40, 100)]:
        image = np.zeros((src, 8), np.float32)
        image[y0] = 1.0
        resized = cv2.resize(image, (8, dst), interpolation=cv2.INTER_LINEAR)[:, 4]
        centroid = (resized * np.arange(dst)).sum() / resized.sum()
        assert centroid == pytest.approx(rescale_rows(y0, src, dst), abs=0.05)  # y * dst / src is 0.17-0.75 off
        assert rescale_rows(rescale_rows(y0, src, dst), dst, src) == pytest.approx(y0)


def test_interpolation_fills_interior_gaps_only():
    y = np.array([np.nan, 1.0, np.nan, np.nan, 4.0, np.nan])
    np.testing.assert_array_equal(interpolate_gaps(y), [np.nan, 1, 2, 3, 4, np.nan])


# ----------------------------------------------------------------------------- data module
def test_samples_carry_masked_targets_in_input_pixels(h5file):
    dm = _dm(h5file, image_size=[96, 80], output_width=20, augment=False)
    dm.setup("fit")
    sample = dm.val_set[0]
    n = int(sample["id"])
    assert sample["image"].shape == (3, 96, 80)
    assert sample["coords"].shape == sample["valid"].shape == (2, 20)
    assert sample["size"].tolist() == [H, W] and sample["spacing_um"] == pytest.approx(3.87)
    want, valid = resample_columns(boundary_rows(n)[:, [0, 2]].T, 20)
    valid[:, :2] = False  # output columns touching the 3 unannotated source columns
    assert (sample["valid"].numpy() == valid).all()
    np.testing.assert_allclose(sample["coords"][valid].numpy(), rescale_rows(want, H, 96)[valid], atol=1e-4)
    assert torch.isnan(sample["coords"][~sample["valid"]]).all()


def test_subject_split_is_seeded_disjoint_and_excludes_unannotated_scans(h5file):
    with pytest.warns(UserWarning, match=rf"layers.h5.*excluded: indices \[{EMPTY}\]"):
        dm = _dm(h5file, seed=3)
        dm.setup("fit")
    dm.setup("test")
    subjects = {k: {int(dm.file_index().subjects[i]) for i in v} for k, v in dm.splits.items()}
    assert sum(len(s) for s in subjects.values()) == 4
    assert not (subjects["train"] & subjects["val"] or subjects["train"] & subjects["test"])
    assert not subjects["val"] & subjects["test"]
    used = np.concatenate(list(dm.splits.values()))
    assert sorted(used) == [i for i in range(N) if i != EMPTY]
    again = _dm(h5file, seed=3)
    again.setup("fit")
    assert all((again.splits[k] == dm.splits[k]).all() for k in dm.splits)


def test_the_split_names_its_held_out_subjects(h5file, caplog):
    dm = _dm(h5file, seed=3)
    with pytest.warns(UserWarning, match="excluded"), caplog.at_level("INFO"):
        dm.setup("fit")
    said = caplog.text
    subjects = {k: sorted({int(dm.file_index().subjects[i]) for i in v}) for k, v in dm.splits.items()}
    # what a result is reported on: the held-out subjects, by the file's own subject numbers
    expected = f"split by subject (seed 3): train {subjects['train']} ({len(dm.splits['train'])} B-scans); "
    assert expected + f"val {subjects['val']} ({len(dm.splits['val'])} B-scans); test {subjects['test']}" in said


def test_cross_validation_folds_test_every_subject_once(h5file, caplog):
    tested: list[int] = []
    for fold in range(4):
        # the recipe's test_fraction stays set: the fold replaces it
        dm = _dm(h5file, seed=3, num_folds=4, fold=fold, test_fraction=0.25)
        with pytest.warns(UserWarning, match="excluded"), caplog.at_level("INFO"):
            dm.setup("fit")
        subjects = {k: set(dm.file_index().subjects[v].tolist()) for k, v in dm.splits.items()}
        assert len(subjects["test"]) == 1 and len(subjects["val"]) == 1 and len(subjects["train"]) == 2
        assert not (subjects["train"] & subjects["val"] or (subjects["train"] | subjects["val"]) & subjects["test"])
        assert f"split by subject (seed 3, test = fold {fold} of 4): train" in caplog.text
        tested += subjects["test"]
    assert sorted(tested) == [1, 2, 3, 4]
    again = _dm(h5file, seed=3, num_folds=4, fold=3)
    with pytest.warns(UserWarning, match="excluded"):
        again.setup("test")
    assert (again.splits["test"] == dm.splits["test"]).all()  # seeded: test reads the fold fit held out


def test_cross_validation_options_are_checked_before_training(h5file, tmp_path):
    with pytest.raises(ConfigError, match=r"--data.init_args.fold in \[0, num_folds\); got num_folds 4, fold 4"):
        _dm(h5file, num_folds=4, fold=4)
    with pytest.raises(ConfigError, match=r"num_folds must be 0 \(none\) or >= 2.*got num_folds 1, fold 0"):
        _dm(h5file, num_folds=1)
    # a fold's network tested on another file: the fold was held out of training for nothing, said
    said = r"the test split that fold 1 of num_folds 4 held out of root \(subjects \[\d\] \(\d B-scans\)\) is "
    with pytest.warns(UserWarning, match=said + r"neither trained on nor tested; set --data.init_args.num_folds 0"):
        _dm(h5file, num_folds=4, fold=1, test_dir=str(h5file)).setup("fit")
    with pytest.raises(DataError, match=r"num_folds 5 is more than the 4 groups \(subjects"), pytest.warns(UserWarning):
        _dm(h5file, num_folds=5).setup("fit")
    published = write_layer_file(tmp_path / "published.h5")
    with h5py.File(published, "a") as f:
        for name, idx in {"train": [0, 1, 2, 6, 7, 8], "val": [3, 4], "test": [9, 10, 11]}.items():
            f[f"splits/{name}"] = np.asarray(idx)
    with pytest.raises(DataError, match=r"published.h5: num_folds 2 draws the test split.*split_by to subject"):
        _dm(published, num_folds=2).setup("fit")


def test_a_file_without_pixel_spacing_says_micrometres_are_not_reported(tmp_path):
    path = write_layer_file(tmp_path / "nospacing.h5", pixel_spacing_um=None)
    # the micrometre metrics used to be left out without a word
    with pytest.warns(UserWarning, match=r"nospacing.h5: no pixel_spacing_um .*--data.init_args.pixel_spacing_um"):
        _dm(path).setup("fit")
    dm = _dm(path, pixel_spacing_um=4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert not [w for w in caught if "pixel_spacing_um" in str(w.message)]
    assert float(dm.val_set[0]["spacing_um"]) == 4.0


def test_without_subjects_splitting_by_bscan_is_an_explicit_choice(tmp_path):
    path = write_layer_file(tmp_path / "nosubj.h5", subject=None)
    # today's code warned and split by B-scan: one eye in training and test, every metric inflated
    listed = r"nosubj.h5.*no subject dataset 'subject'.*'images'.*'layer_maps'.*subject_key.*split_by: bscan"
    with pytest.raises(DataError, match=listed):
        _dm(path, val_fraction=0.2, test_fraction=2).setup("fit")
    dm = _dm(path, val_fraction=0.2, test_fraction=2, split_by="bscan")
    dm.setup("fit")
    assert (len(dm.splits["val"]), len(dm.splits["test"])) == (2, 2)


def test_interpolate_policy_bridges_the_fluid_gap(h5file):
    masked = _dm(h5file, layer_indices=[1], augment=False)
    filled = _dm(h5file, layer_indices=[1], augment=False, nan_policy="interpolate")
    for dm in (masked, filled):
        dm.setup("fit")
    a, b = masked.val_set[0], filled.val_set[0]
    assert not a["valid"][0, 20:23].any() and b["valid"][0, 20:23].all()
    assert not b["valid"][0, :3].any()  # outside the annotation nothing is invented
    np.testing.assert_allclose(b["coords"][0, 19:24].numpy(), boundary_rows(int(b["id"]))[19:24, 1], atol=1e-4)


def test_loader_workers_open_the_file_themselves(h5file):
    dm = _dm(h5file, num_workers=1, augment=False)
    dm.setup("fit")
    dm.val_set[0]  # opens a handle in this process; it must not travel into the worker
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, H, W) and batch["valid"].dtype == torch.bool


def _band_contrast(sample) -> float:
    """Image value on the bright band (between the two rows) minus 4 px above the upper row."""
    img = sample["image"][0].numpy()
    xs = np.arange(img.shape[1])
    ok = sample["valid"].all(0).numpy()
    top, bottom = sample["coords"][0].numpy()[ok], sample["coords"][1].numpy()[ok]
    inside = img[np.round((top + bottom) / 2).astype(int), xs[ok]]
    above = img[np.clip(np.round(top - 4).astype(int), 0, None), xs[ok]]
    return float(np.mean(inside - above))


def test_geometric_augmentation_moves_rows_with_the_image(h5file):
    dm = _dm(h5file, layer_indices=[0, 1], augment=False)
    dm.setup("fit")
    plain = dm.val_set[0]
    aug = LayerAugmentation(hflip=0.5, shift=0.1, scale=0.15, elastic=1.0, elastic_amplitude=0.08)
    aug.photometric = None
    dm.val_set.transform = SeededTransform(aug)  # type: ignore[arg-type]
    torch.manual_seed(0)
    moved = 0
    for _ in range(6):
        sample = dm.val_set[0]
        ok = sample["valid"].all(0) & plain["valid"].all(0)
        moved += float((sample["coords"][:, ok] - plain["coords"][:, ok]).abs().mean()) > 1
        # the rows still sit on the bright band, wherever the image moved
        assert _band_contrast(sample) > 0.8 * _band_contrast(plain)
    assert moved >= 4


def _shift_draws(top: int, bottom: int, draws: int = 200) -> tuple[np.ndarray, list[np.ndarray]]:
    """Boundary shifts and images of a 64 x 32 B-scan (vitreous 0.3, retina 0.9 between ``top`` and
    ``bottom``) under shift-only augmentation; every draw asserts that no boundary was lost."""
    image = np.full((64, 32), 0.3, np.float32)
    image[top:bottom] = 0.9
    coords = np.stack([np.full(32, float(top)), np.full(32, float(bottom))])
    aug = LayerAugmentation(hflip=0, shift=0.3, scale=0, brightness_contrast=0, speckle=0, noise=0)
    aug.set_random_seed(0)
    shifts, images = [], []
    for _ in range(draws):
        out = aug(image, coords, np.ones_like(coords, bool))
        assert out["valid"].all(), "a shift pushed an annotated boundary out of the image"
        shifts.append(out["coords"][0, 0] - top)
        images.append(out["image"])
    return np.array(shifts), images


def test_vertical_shift_spans_retina_positions_without_losing_boundaries_or_adding_edges():
    shifts, images = _shift_draws(top=20, bottom=40)
    # room: 20 rows above ILM, 23 below BM, 0.3 x 64 = 19.2 allowed -> both ways, far beyond 5 % of 64
    assert shifts.max() > 15 and shifts.min() < -15 and np.abs(shifts).max() <= 19.2 + 1e-4
    # exposed rows mirror the vitreous/choroid: no black band (a dark-to-bright edge that is no ILM)
    assert min(float(im.min()) for im in images) > 0.29
    # the retina band moves with the boundary rows
    for t, im in zip(shifts[:20], images[:20], strict=True):
        assert im[int(round(20 + t)) + 2, 0] > 0.8 and im[int(round(20 + t)) - 2, 0] < 0.4


def test_vertical_shift_is_narrowed_when_the_retina_touches_the_border():
    shifts, _ = _shift_draws(top=3, bottom=40)
    assert np.abs(shifts).max() <= 3 + 1e-4  # the mirrored band may not reach the ILM


def test_horizontal_flip_reverses_columns_and_round_trips(h5file):
    dm = _dm(h5file, augment=False, output_width=W)
    dm.setup("fit")
    plain = dm.val_set[0]
    flip = LayerAugmentation(hflip=1.0, shift=0, scale=0, brightness_contrast=0, speckle=0, noise=0)
    dm.val_set.transform = SeededTransform(flip)  # type: ignore[arg-type]
    flipped = dm.val_set[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["valid"], plain["valid"].flip(-1))
    np.testing.assert_array_equal(flipped["coords"].flip(-1).numpy(), plain["coords"].numpy())
    twice = flip(flipped["image"][0].numpy(), flipped["coords"].numpy(), flipped["valid"].numpy())
    np.testing.assert_array_equal(twice["coords"], plain["coords"].numpy())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("overrides", "kw", "message"),
    [
        ({"layer_maps": None}, {}, "no dataset 'layer_maps'"),
        ({"images": np.zeros((N, H), np.uint8)}, {}, r"'images' has shape \(12, 48\)"),
        ({"layer_maps": np.zeros((N, W, L, 1), np.float32)}, {}, "'layer_maps'.*3 dimensions"),
        ({"layer_maps": np.full((N, L, W), 10, np.float32)}, {}, "widths.*fit image_axes: NHW, layer_axes: NLW"),
        ({"layer_maps": np.full((N - 1, W, L), 10, np.float32)}, {}, r"\(N=12.*\(N=11.*numbers of B-scans"),
        ({}, {"layer_indices": [0, 3]}, r"layer_indices \[0, 3\] out of range.*3 boundaries"),
        ({"layer_maps": np.full((N, W, L), np.nan, np.float32)}, {}, "'layer_maps' are all NaN"),
        ({"layer_maps": np.full((N, W, L), np.inf, np.float32)}, {}, r"'layer_maps'\[0\] holds infinite"),
        ({"layer_maps": np.full((N, W, L), 500, np.float32)}, {}, "rows outside the image"),
        ({"subject": np.arange(3)}, {}, "'subject' has 3 entries"),
    ],
)
def test_bad_files_are_errors_naming_file_and_dataset(tmp_path, overrides, kw, message):
    path = write_layer_file(tmp_path / "bad.h5", **overrides)
    with pytest.raises(DataError, match=f"bad.h5.*{message}"):
        _dm(path, **kw).setup("fit")


def test_non_finite_pixels_are_an_error_naming_the_bscan(tmp_path):
    images = np.full((N, H, W), 0.5, np.float32)
    images[7, 3, 3] = np.nan
    path = write_layer_file(tmp_path / "nanimg.h5", images=images)
    dm = _dm(path, augment=False)
    dm.setup("fit")
    dm.setup("test")
    ds = next(s for s in (dm.train_set, dm.val_set, dm.test_set) if 7 in s.indices)
    with pytest.raises(DataError, match=r"nanimg.h5: 'images'\[7\] holds non-finite"):
        ds[ds.indices.index(7)]


def test_layer_key_is_configurable_like_the_duke_amd_export(tmp_path):
    path = write_layer_file(tmp_path / "amd.h5", layer_maps=None, layerMaps=np.full((N, W, L), 12, np.float32))
    dm = _dm(path, layer_key="layerMaps", layer_indices=None, augment=False)  # default: first and last
    dm.setup("fit")
    assert dm.val_set.layer_indices == [0, 2]
    assert dm.val_set[0]["valid"].all()


# ----------------------------------------------------------------------------- losses and metrics
class Fixed(nn.Module):
    """A stand-in network returning given rows (as fractions of the input height)."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = rows
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows / x.shape[-2] + self.p


def _batch(coords, valid, height=64):
    b = coords.shape[0]
    return {
        "image": torch.zeros(b, 1, height, 8),
        "coords": coords,
        "valid": valid,
        "size": torch.tensor([[2 * height, 16]] * b),
        "spacing_um": torch.full((b,), 4.0),
        "id": [f"{i}" for i in range(b)],
    }


@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1"])
def test_masked_loss_equals_loss_over_valid_columns(kind):
    torch.manual_seed(0)
    pred = torch.rand(3, 2, 8) * 64
    coords = torch.rand(3, 2, 8) * 64
    valid = torch.rand(3, 2, 8) > 0.4
    coords[~valid] = float("nan")
    task = LayerRegressionTask(Fixed(pred), loss=kind)
    _, loss = task._step(_batch(coords, valid))
    fn = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}[kind]
    assert loss.item() == pytest.approx(fn(pred[valid], coords[valid]).item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(task.net.p.grad)


def test_order_penalty_only_for_boundaries_out_of_order():
    task = LayerRegressionTask(Fixed(torch.zeros(1)), order_weight=1.0)
    assert task.order_penalty(torch.tensor([[[10.0, 10.0], [20.0, 10.0]]])) == 0
    assert task.order_penalty(torch.tensor([[[30.0, 10.0], [20.0, 10.0]]])) == pytest.approx(100 / 2)


def test_boundary_error_in_original_pixels_micrometres_and_thickness():
    target = torch.tensor([[[10.0, 10.0, 10.0], [20.0, 20.0, float("nan")]]])
    pred = torch.tensor([[[11.0, 12.0, 13.0], [20.0, 24.0, 0.0]]])
    valid = torch.isfinite(target)
    metric = BoundaryError(2, (0, 1))
    metric.update(pred, target, valid, torch.tensor([2.0]), torch.tensor([3.87]))
    out = metric.compute()
    # ILM: |1|,|2|,|3| -> 2 input px -> 4 original px; BM: 0, 4 -> 2 -> 4 original px
    assert out["mae_px"].tolist() == pytest.approx([4.0, 4.0])
    assert out["mae_um"].tolist() == pytest.approx([4.0 * 3.87, 4.0 * 3.87])
    # thickness (BM - ILM) errors where both are annotated: -1, +2 -> mean 1.5 input px
    assert float(out["thickness_mae_px"]) == pytest.approx(3.0)
    # batching does not change the epoch value (sum states, as synced under DDP)
    halves = BoundaryError(2, (0, 1))
    for cols in (slice(0, 1), slice(1, 3)):
        halves.update(pred[..., cols], target[..., cols], valid[..., cols], torch.tensor([2.0]), torch.tensor([3.87]))
    assert torch.allclose(halves.compute()["mae_px"], out["mae_px"])
    # unknown spacing: pixels still counted, micrometres not
    unknown = BoundaryError(2)
    unknown.update(pred, target, valid, torch.tensor([2.0]), torch.tensor([float("nan")]))
    assert torch.isnan(unknown.compute()["mae_um"]).all() and unknown.compute()["mae_px"][0] == pytest.approx(4.0)


def test_predictions_map_back_to_original_columns_and_rows(h5file):
    dm = _dm(h5file, image_size=[96, 64], output_width=24, augment=False)
    dm.setup("fit")
    sample = dm.val_set[0]
    task = LayerRegressionTask(Fixed(torch.zeros(1)))
    truth = boundary_rows(int(sample["id"]))[:, [0, 2]].T
    rows = task.to_original(torch.nan_to_num(sample["coords"]), sample["size"], 96)
    assert rows.shape == (2, W)
    np.testing.assert_allclose(rows[:, 5:-1], truth[:, 5:-1], atol=1e-4)  # away from the NaN/clamped edges


# ----------------------------------------------------------------------------- model
def test_segformer_regressor_shapes_and_local_pretrained_directory(tmp_path):
    from transformers import SegformerConfig, SegformerModel

    cfg = json.loads(TINY_SEGFORMER)
    net = SegFormerLayerRegressor(
        num_boundaries=3, output_width=24, in_channels=1, config=cfg, head="pool", pool_height=2, dropout=0.2
    )
    out = net(torch.randn(2, 1, 64, 48))
    assert out.shape == (2, 3, 24)
    assert torch.allclose(out, torch.full_like(out, 0.5))  # a fresh head starts at mid-height
    saved = SegformerModel(SegformerConfig(num_channels=3, **cfg))
    saved.save_pretrained(tmp_path / "mit")
    loaded = SegFormerLayerRegressor(output_width=16, pretrained=str(tmp_path / "mit"))
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key
    # from_pretrained returns the encoder in eval mode, which Lightning keeps: its dropout and drop-path
    # were off in training (Lightning's "Found 180 module(s) in eval mode at the start of training")
    assert all(m.training for m in loaded.modules())
    with pytest.raises(ConfigError, match="pretrained .*nvidia-mit-b0: not a local pretrained SegFormer directory"):
        SegFormerLayerRegressor(pretrained=str(tmp_path / "nvidia-mit-b0"))
    SegformerModel(SegformerConfig(num_channels=1, **cfg)).save_pretrained(tmp_path / "mit-grey")
    with pytest.raises(ConfigError, match=r"takes 1 input channels and the data gives 3 .*: set it to 1"):
        SegFormerLayerRegressor(pretrained=str(tmp_path / "mit-grey"), in_channels=3)


def test_order_boundaries_keeps_ordered_rows_and_lifts_crossing_ones():
    rows = torch.tensor([[[10.0, 10.0, 30.0], [20.0, 5.0, 30.0], [15.0, 40.0, 29.0]]])  # (1, L=3, W=3)
    out = order_boundaries(rows)
    assert out[0, :, 0].tolist() == [10.0, 20.0, 20.0]  # the third lies above the second: placed on it
    assert out[0, :, 1].tolist() == [10.0, 10.0, 40.0]
    assert out[0, :, 2].tolist() == [30.0, 30.0, 30.0]
    ordered = torch.sort(torch.rand(2, 4, 7) * 50, dim=1).values
    assert torch.allclose(order_boundaries(ordered), ordered)  # up to rounding of s + (r - s)


def test_soft_argmax_of_a_peaked_distribution_is_its_row():
    logits = torch.full((1, 2, 32, 5), -1e4)
    logits[0, 0, 7] = 0.0
    logits[0, 1, 20:22] = 0.0  # two equal rows: the expectation lies between them
    rows = soft_argmax_rows(logits)
    assert torch.allclose(rows[0, 0], torch.full((5,), 7.0)) and torch.allclose(rows[0, 1], torch.full((5,), 20.5))


def test_row_cross_entropy_against_a_gaussian_target_ignores_invalid_columns():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 3, requires_grad=True)
    target = torch.tensor([[[3.0, 7.5, float("nan")]], [[0.0, 15.0, 8.0]]])
    valid = torch.isfinite(target)
    loss = row_cross_entropy(logits, target, valid, sigma=1.0)
    rows = torch.arange(16.0)
    want = []
    for b, w in zip(*torch.nonzero(valid[:, 0], as_tuple=True), strict=True):
        t = torch.softmax(-0.5 * (rows - target[b, 0, w]) ** 2, 0)
        want.append(-(t * logits[b, 0, :, w].log_softmax(0)).sum())
    assert loss.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[0, 0, :, 2] == 0).all()
    # lowest where the distribution is the target itself
    peaked = torch.log(torch.softmax(-0.5 * (rows - 5.0) ** 2, 0)).view(1, 1, 16, 1)
    shifted = torch.log(torch.softmax(-0.5 * (rows - 9.0) ** 2, 0)).view(1, 1, 16, 1)
    t5, ok = torch.tensor([[[5.0]]]), torch.tensor([[[True]]])
    assert row_cross_entropy(peaked, t5, ok) < row_cross_entropy(shifted, t5, ok)


@pytest.mark.parametrize("backbone", ["segformer", "unet"])
def test_soft_argmax_nets_predict_ordered_rows_at_every_column(backbone):
    torch.manual_seed(0)
    if backbone == "segformer":
        cfg = json.loads(TINY_SEGFORMER)
        net = SegFormerLayerRegressor(num_boundaries=3, output_width=24, in_channels=1, config=cfg)
    else:
        net = UNetLayerRegressor(num_boundaries=3, output_width=24, in_channels=1, decoder_channels=[16, 8, 8, 8, 8])
    assert net.pretrained_encoder is False
    net.train()
    for _ in range(3):  # random weights and inputs: the order holds by construction, not by training
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=1.0)
        out = net(torch.randn(2, 1, 64, 32))
        assert out["rows"].shape == (2, 3, 24) and out["row_logits"].shape == (2, 3, 64, 24)
        rows = out["rows"]
        assert ((rows >= 0) & (rows <= 63 / 64)).all()  # fractions of the input height, pixel centres
        assert (rows[:, 1:] - rows[:, :-1] >= 0).all()  # never crossing, in every column


def test_task_trains_rows_with_row_ce_plus_l1_and_knows_the_constant_baseline():
    torch.manual_seed(0)
    net = UNetLayerRegressor(num_boundaries=2, output_width=16, in_channels=1, decoder_channels=[16, 8, 8, 8, 8])
    task = LayerRegressionTask(net, loss="ce_l1")
    coords = torch.tensor([[10.0, 40.0]]).view(1, 2, 1).expand(2, 2, 16).clone()
    coords[1] += 4
    batch = _batch(coords, torch.ones_like(coords, dtype=torch.bool), height=64)
    batch["image"] = torch.randn(2, 1, 64, 32)
    pred, loss = task._step(batch)
    rows, logits = task.predict_rows(batch["image"])
    l1 = (rows - coords).abs().mean()
    assert loss.item() == pytest.approx((l1 + row_cross_entropy(logits, coords, batch["valid"])).item(), rel=1e-4)
    # The best constant: each boundary's mean row (12, 42) -> L1 of 2 px, plus the CE of the rows' histogram.
    constant = task.constant_loss(batch)
    assert 2.0 < constant.item() < loss.item()
    with pytest.raises(ValueError, match="row_logits"):
        LayerRegressionTask(Fixed(coords), loss="ce_l1")._step(batch)


# ----------------------------------------------------------------------------- CLI
CONFIG = str(REPO / "hparams" / "oct_segformer.json")


def _cli_args(subcommand: str, root: Path, runs: Path, *extra: str, fast: bool = True) -> list[str]:
    """The published config on the fixture with a tiny SegFormer; ``fast=False`` runs every batch."""
    return [
        subcommand,
        "--config",
        CONFIG,
        "--data.init_args.root",
        str(root),
        "--data.init_args.image_size",
        "64",
        "--data.init_args.output_width",
        "32",
        "--data.init_args.layer_indices",
        "[0, 2]",
        "--data.init_args.val_fraction",
        "1",
        "--data.init_args.test_fraction",
        "1",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
        "--model.init_args.net.init_args.output_width",
        "32",
        "--model.init_args.net.init_args.head_channels",
        "8",
        "--model.init_args.net.init_args.config",
        TINY_SEGFORMER,
        "--trainer.default_root_dir",
        str(runs),
        *CPU_TRAINER,
        *(["--trainer.fast_dev_run", "true"] if fast else ["--comet", "false"]),
        *extra,
    ]


def test_published_config_fits_one_fast_dev_run_step(h5file, tmp_path):
    cli = run_cli(_cli_args("fit", h5file, tmp_path))
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["val/mae_px"])


def test_unet_recipe_fits_one_fast_dev_run_step(h5file, tmp_path):
    args = _cli_args("fit", h5file, tmp_path)
    args[args.index(CONFIG)] = str(REPO / "hparams" / "oct_unet.json")
    segformer_only = args.index("--model.init_args.net.init_args.head_channels")
    del args[segformer_only : segformer_only + 4]  # head_channels and config: SegFormer's
    cli = run_cli([*args, "--model.init_args.net.init_args.decoder_channels", "[16, 8, 8, 8, 8]"])
    assert type(cli.model.net).__name__ == "UNetLayerRegressor" and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["val/mae_px"])


def test_fit_checkpoints_on_boundary_error_then_test_and_predict_write_results(h5file, tmp_path):
    one_step = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--overlay_every_n_epochs", "1"]
    cli = run_cli(_cli_args("fit", h5file, tmp_path / "fit", *one_step, fast=False))
    assert cli.model.monitor == "val/mae_px"
    run_dir = Path(cli.trainer.log_dir)
    best = run_dir / "checkpoints" / "best.ckpt"
    assert best.is_file() and list(run_dir.glob("overlays/epoch_000/*.png"))
    metrics = cli.trainer.callback_metrics
    for key in ("val/mae_px", "val/mae_px_ILM", "val/mae_um_BM", "val/thickness_mae_um"):
        assert torch.isfinite(metrics[key]), key

    cli = run_cli(_cli_args("test", h5file, tmp_path / "test", "--ckpt_path", str(best), fast=False))
    rows = list(csv.DictReader(open(next((tmp_path / "test").rglob("test_metrics.csv")))))
    assert len(rows) == len(cli.datamodule.test_set) and len({r["subject"] for r in rows}) == 1
    for r in rows:
        assert float(r["mae_um_ILM"]) == pytest.approx(3.87 * float(r["mae_px_ILM"]), rel=1e-4)
        assert 0 < int(r["columns_BM"]) <= 32
    # per subject, pooled over its annotated A-scans: for the one test subject, the split's logged figures
    (subject,) = csv.DictReader(open(next((tmp_path / "test").rglob("test_subjects.csv"))))
    assert subject["subject"] == rows[0]["subject"] and int(subject["bscans"]) == len(rows)
    for key in ("mae_px", "mae_px_ILM", "mae_um_BM", "thickness_mae_px", "thickness_mae_um"):
        assert float(subject[key]) == pytest.approx(float(cli.trainer.callback_metrics[f"test/{key}"]), rel=1e-4), key
    assert "_thickness_columns" not in rows[0]

    run_cli(
        _cli_args(
            "predict",
            h5file,
            tmp_path / "pred",
            "--ckpt_path",
            str(best),
            "--model.init_args.mc_samples",
            "3",
            "--model.init_args.net.init_args.dropout",
            "0.5",
            fast=False,
        )
    )
    out = next((tmp_path / "pred").rglob("predictions"))
    ids = sorted(p.name.split("_")[0] for p in out.glob("*_boundaries.npy"))
    assert ids
    rows = np.load(out / f"{ids[0]}_boundaries.npy")
    assert rows.shape == (2, W)  # one row per boundary and per *original* column
    assert np.load(out / f"{ids[0]}_std.npy").max() > 0
    table = list(csv.DictReader(open(out / f"{ids[0]}_boundaries.csv")))
    assert len(table) == W and {"ILM", "BM", "thickness_px", "thickness_um", "ILM_std"} <= set(table[0])
    assert float(table[3]["thickness_px"]) == pytest.approx(rows[1, 3] - rows[0, 3], abs=1e-3)
    from PIL import Image

    assert Image.open(out / f"{ids[0]}_overlay.png").size == (W, H)


def test_predict_on_an_unannotated_file(h5file, tmp_path):
    images_only = write_layer_file(tmp_path / "new.h5", layer_maps=None, subject=None)
    run_cli(_cli_args("predict", h5file, tmp_path / "runs", "--data.init_args.predict_dir", str(images_only)))
    out = next((tmp_path / "runs").rglob("predictions"))
    # fast_dev_run predicts one batch: the file's first two B-scans (unannotated, so none is excluded)
    want = [f"0000{i}_{kind}.npy" for i in (0, 1) for kind in ("boundaries", "thickness")]
    assert sorted(p.name for p in out.glob("*.npy")) == want


# ----------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_duke_dme_file_loads_with_subject_wise_splits():
    path = shared("duke_dme/duke_dme_trainval.h5")
    dm = OCTLayerDataModule(
        str(path), batch_size=4, num_workers=0, layer_indices=[0, 7], image_size=128, output_width=64
    )
    dm.setup("fit")
    dm.setup("test")
    index = dm.file_index()
    assert (index.n, index.height, index.width, index.num_boundaries) == (88, 496, 768, 8)
    subjects = {k: set(index.subjects[v].tolist()) for k, v in dm.splits.items()}
    assert sum(len(v) for v in dm.splits.values()) == 88  # every B-scan annotates ILM and BM
    assert set.union(*subjects.values()) == set(range(1, 9))
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not subjects[a] & subjects[b], (a, b)
    # subject-wise 4-fold cross-validation: each of the 8 subjects is tested by exactly one fold
    tested = []
    for fold in range(4):
        cv = OCTLayerDataModule(str(path), num_workers=0, layer_indices=[0, 7], num_folds=4, fold=fold)
        cv.setup("fit")
        test, train = (index.subjects[cv.splits[k]].tolist() for k in ("test", "train"))
        assert len(set(test)) == 2 and not set(train) & set(test)
        tested += test
    assert sorted(set(tested)) == list(range(1, 9)) and len(tested) == 88
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 128, 128) and batch["coords"].shape == (4, 2, 64)
    assert batch["spacing_um"].tolist() == pytest.approx([3.87] * 4)
    coords, valid = batch["coords"], batch["valid"]
    assert 0.5 < valid.float().mean() < 0.9  # Duke annotates the central columns only
    assert (coords[:, 0][valid.all(1)] < coords[:, 1][valid.all(1)]).all()  # ILM above BM


# ----------------------------------------------------------------------------- files as researchers export them
def _samples(dm: OCTLayerDataModule, dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {s["id"]: (s["image"].numpy(), s["coords"].numpy()) for s in (dataset[i] for i in range(len(dataset)))}


@pytest.mark.parametrize(
    "image_axes, layer_axes", [("HWN", "NWL"), ("HWN", "LWN"), ("NHW", "NLW"), ("NWH", "LWN")]
)  # scipy.io.loadmat order; both transposed; (N, L, W) maps; a v7.3 .mat read by h5py (all axes reversed)
def test_matlab_order_arrays_read_through_the_axis_options(tmp_path, image_axes, layer_axes):
    reference = _dm(write_layer_file(tmp_path / "ref.h5"), augment=False)
    reference.setup("fit")
    with h5py.File(tmp_path / "ref.h5") as f:
        images, maps, subjects = f["images"][()], f["layer_maps"][()], f["subject"][()]
    order = {"N": 0, "H": 1, "W": 2}
    lorder = {"N": 0, "W": 1, "L": 2}
    path = tmp_path / "matlab.h5"
    with h5py.File(path, "w") as f:
        f["images"] = images.transpose([order[a] for a in image_axes])
        f["layer_maps"] = maps.transpose([lorder[a] for a in layer_axes])
        f["subject"] = subjects
    with pytest.raises(DataError, match=r"matlab.h5.*image_axes.*layer_axes"):
        _dm(path).setup("fit")  # today's code: no option, and an error that did not say how to read it
    dm = _dm(path, image_axes=image_axes, layer_axes=layer_axes, augment=False)
    dm.setup("fit")
    assert dm.splits.keys() == reference.splits.keys()
    for name in ("train", "val"):
        np.testing.assert_array_equal(dm.splits[name], reference.splits[name])
    got, want = _samples(dm, dm.val_set), _samples(reference, reference.val_set)
    for key in want:
        np.testing.assert_array_equal(got[key][0], want[key][0])
        np.testing.assert_array_equal(got[key][1], want[key][1])


def test_a_subject_dataset_of_another_name_is_an_option(tmp_path):
    path = write_layer_file(tmp_path / "amd.h5", subject=None, patient_indices=np.repeat([7.0, 8.0, 9.0, 10.0], 3))
    dm = _dm(path, subject_key="patient_indices")
    dm.setup("fit")
    subjects = dm.file_index().subjects
    parts = {k: set(subjects[v].tolist()) for k, v in dm.splits.items()}
    assert all(len(p) == 1 for p in (parts["val"], parts["test"])) and not parts["train"] & parts["val"]


def test_the_files_own_splits_group_is_honoured(tmp_path):
    splits = {"train": [0, 1, 2, 6, 7, 8], "val": [3, 4, 5], "test": [9, 10, 11]}
    path = write_layer_file(tmp_path / "published.h5", subject=None)
    with h5py.File(path, "a") as f:
        for name, idx in splits.items():
            f[f"splits/{name}"] = np.asarray(idx)
    dm = _dm(path)
    dm.setup("fit")
    # B-scan EMPTY (5) has no annotated column: excluded from its split, as from any split
    assert {k: v.tolist() for k, v in dm.splits.items()} == {**splits, "val": [3, 4]}
    by_bscan = _dm(path, split_by="bscan")  # an explicit choice wins over the file's group
    by_bscan.setup("fit")
    assert by_bscan.splits["val"].tolist() != [3, 4]
    with h5py.File(path, "a") as f:
        f["splits/test"][0] = 4
    with pytest.raises(DataError, match=r"published.h5: splits/val and splits/test share B-scans \[4\]"):
        _dm(path).setup("fit")
    plain = write_layer_file(tmp_path / "plain.h5")
    with pytest.raises(DataError, match=r"plain.h5: split_by is file but the file has no 'splits' group"):
        _dm(plain, split_by="file").setup("fit")


def test_test_dir_scores_every_bscan_of_another_file(h5file, tmp_path):
    other = write_layer_file(tmp_path / "held_out.h5", subject=None)  # no subjects: nothing to split
    dm = _dm(h5file, test_dir=str(other), augment=False)
    # today's code could only test a split of root: "cannot split 2 groups into parts of [0, 2]"
    dm.setup("test")
    assert len(dm.test_set) == N - 1 and dm.test_set.path == other  # every annotated B-scan (EMPTY has none)

    # predict without predict_dir predicts what test scores (it said "no test split to predict")
    dm = _dm(h5file, test_dir=str(other), test_fraction=0, augment=False)
    dm.setup("predict")
    assert dm.predict_set.path == other and len(dm.predict_set) == N  # every B-scan, annotated or not


def test_test_dir_beside_a_test_fraction_warns_that_roots_test_subjects_are_lost(h5file, tmp_path):
    """A new user's trial: with test_dir, the recipe's test_fraction still held subject 1 out of training,
    and nothing tested it; nothing said so."""
    other = write_layer_file(tmp_path / "held_out.h5", subject=None)
    dm = _dm(h5file, test_dir=str(other), augment=False, test_fraction=0.25)
    with pytest.warns(UserWarning, match=r"the test split that test_fraction 0.25 held out of root \(subjects \[\d.*"
                      r"is neither trained on nor tested; set --data.init_args.test_fraction 0"):  # fmt: skip
        dm.setup("fit")
    dm = _dm(h5file, test_dir=str(other), augment=False, test_fraction=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert not [w for w in caught if "test_fraction" in str(w.message)]


def test_the_shape_error_suggests_the_axis_orders_of_a_duke_amd_export():
    """(H, W, N) images beside (N, W, L) layer maps: the fix is image_axes HWN with the default layer order
    (it once suggested HNW / WNL, which reads W B-scans N columns wide)."""
    from octlightning.data.formats.layer_h5 import fitting_axes

    assert fitting_axes((512, 1000, 100), (100, 1000, 3)) == " (these shapes fit image_axes: HWN, layer_axes: NWL)"
    assert fitting_axes((128, 100, 8), (8, 100, 3)) == " (these shapes fit image_axes: HWN, layer_axes: NWL)"
    assert fitting_axes((12, 48, 40), (12, 3, 40)) == " (these shapes fit image_axes: NHW, layer_axes: NLW)"
