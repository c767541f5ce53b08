import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from octlightning.data.fundus import FundusVesselDataModule, load_fundus_records
from octlightning.errors import DataError
from tests.conftest import shared


def _dm(root, **kw):
    return FundusVesselDataModule(str(root), batch_size=2, num_workers=0, **kw)


def test_drive_layout_loads_with_seeded_split_and_fov(drive_root):
    dm = _dm(drive_root, val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 9
    assert len(dm.val_set) == 3
    dm2 = _dm(drive_root, val_fraction=0.34)
    dm2.setup("fit")
    assert [r.id for r in dm2.val_set.records] == [r.id for r in dm.val_set.records]
    batch = next(iter(dm.val_dataloader()))
    # 64 x 72 images are padded to the next multiple of 32 with fov = 0 in the padding.
    assert batch["image"].shape == (2, 3, 64, 96)
    assert batch["mask"].shape == batch["fov"].shape == (2, 1, 64, 96)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["fov"][..., 72:].sum() == 0
    assert batch["size"].tolist() == [[64, 72], [64, 72]]
    dm.setup("test")
    assert [r.id for r in dm.test_set.records] == ["01", "02"]


def test_patch_training_draws_patches_per_image_and_keeps_fov_with_the_image(drive_root):
    dm = _dm(drive_root, patch_size=32, patches_per_image=3, in_channels=1, clahe=True)
    dm.setup("fit")
    assert len(dm.train_set) == 3 * len(dm.train_set.records)
    sample = dm.train_set[0]
    assert sample["image"].shape == (1, 32, 32)
    assert sample["mask"].shape == sample["fov"].shape == (1, 32, 32)
    # vessels only inside the FOV, also after augmentation
    assert not ((sample["mask"] > 0) & (sample["fov"] == 0)).any()


def test_augmentation_follows_the_global_seed(drive_root):
    dm = _dm(drive_root)
    dm.setup("fit")
    torch.manual_seed(3)
    a = dm.train_set[0]["image"]
    dm.train_set.transform._seed = None
    torch.manual_seed(3)
    b = dm.train_set[0]["image"]
    assert torch.equal(a, b)


def _copy(drive_root, tmp_path):
    dst = tmp_path / "drive"
    shutil.copytree(drive_root, dst)
    return dst


def test_missing_mask_is_an_error_naming_the_image(drive_root, tmp_path):
    root = _copy(drive_root, tmp_path)
    (root / "training" / "1st_manual" / "23_manual1.gif").unlink()
    with pytest.raises(DataError, match="23_training.tif"):
        _dm(root).setup("fit")


def test_mask_without_image_is_an_error(drive_root, tmp_path):
    root = _copy(drive_root, tmp_path)
    (root / "training" / "images" / "24_training.tif").unlink()
    with pytest.raises(DataError, match="24_manual1.gif"):
        _dm(root).setup("fit")


def test_non_binary_mask_is_an_error_naming_the_file(drive_root, tmp_path):
    root = _copy(drive_root, tmp_path)
    path = root / "training" / "1st_manual" / "22_manual1.gif"
    Image.fromarray(np.arange(64 * 72, dtype=np.uint8).reshape(64, 72) % 7).save(path)
    with pytest.raises(DataError, match="22_manual1.gif.*not binary"):
        _dm(root).setup("fit")


@pytest.mark.parametrize("content", [b"", b"GIF89a-truncated"])
def test_unreadable_files_are_errors_naming_the_file(drive_root, tmp_path, content):
    root = _copy(drive_root, tmp_path)
    (root / "training" / "images" / "25_training.tif").write_bytes(content)
    with pytest.raises(DataError, match="25_training.tif"):
        _dm(root).setup("fit")


def test_fraction_mismatch_is_an_error_naming_both_files(drive_root, tmp_path):
    root = _copy(drive_root, tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "training" / "mask" / "26_training_mask.gif")
    with pytest.raises(DataError, match="26_training_mask.gif.*26_training.tif"):
        _dm(root).setup("fit")


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nowhere: not found.*--data.init_args.root"):
        _dm(tmp_path / "nowhere").setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty/training: DRIVE train folder not found"):
        _dm(tmp_path / "empty", layout="drive").setup("fit")


def test_folder_layout_with_different_sizes_pads_per_batch(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i, (h, w) in enumerate([(40, 50), (48, 36), (40, 40), (33, 47)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"c{i}.png")
        Image.fromarray((rng.random((h, w)) > 0.8).astype(np.uint8)).save(tmp_path / "masks" / f"c{i}.png")
    dm = _dm(tmp_path, layout="folder", val_fraction=0.5, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[-2] % 32 == 0 and batch["image"].shape[-1] % 32 == 0
    assert batch["fov"].sum() > 0  # folder layout without fov/: the whole image counts


@pytest.mark.realdata
def test_real_drive_training_set_loads():
    root = shared("drive")
    dm = _dm(root, val_fraction=0.2)
    records = dm._training_records()
    assert len(records) == 20
    assert {r.id for r in records} == {str(i) for i in range(21, 41)}
    for r in records:
        assert r.image.shape == (584, 565, 3)
        assert set(np.unique(r.vessels)) == {0, 1}
        assert set(np.unique(r.fov)) == {0, 1}
        assert r.vessels[r.fov == 0].sum() < 0.01 * r.vessels.sum() + 50
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (16, 4)


# ----------------------------------------------------------------------------- layouts as distributed
def test_the_layout_is_recognised_from_the_folder_and_said(drive_root, tmp_path, caplog):
    from tests.fixtures.fundus import write_chase_layout, write_folder_layout, write_kaggle_layout

    roots = {
        "drive": drive_root,
        "chase": write_chase_layout(tmp_path / "CHASEDB1"),
        "kaggle": write_kaggle_layout(tmp_path / "kaggle"),
        "folder": write_folder_layout(tmp_path / "plain"),
    }
    roots["kaggle Data/"] = roots["kaggle"] / "Data"  # the Data/ folder itself works too
    for name, root in roots.items():
        caplog.clear()
        with caplog.at_level("INFO"):
            dm = _dm(root, augment=False)
            dm.setup("fit")
            dm.setup("test")
        layout = name.split()[0]
        said = [r.getMessage() for r in caplog.records if "layout" in r.getMessage()]
        assert said == [f"FundusVesselDataModule: {root} has the {layout} layout (detected; set layout to override)"]
        assert len(dm.test_set) == 2 and dm.hparams.layout is None
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=r"other: no fundus layout recognised.*Data/train/image.*set layout"):
        _dm(tmp_path / "other").setup("fit")


def test_kaggle_masks_are_cut_at_127_and_the_fov_comes_from_the_image(tmp_path):
    from tests.fixtures.fundus import write_kaggle_layout

    root = write_kaggle_layout(tmp_path / "kaggle", n_train=2)
    grey = np.asarray(Image.open(root / "Data" / "train" / "mask" / "0.png"))
    assert grey.dtype == np.uint8 and len(np.unique(grey)) > 2  # interpolated grey edges, as distributed
    files = [("0", root / "Data" / "train" / "image" / "0.png", root / "Data" / "train" / "mask" / "0.png", None)]
    with pytest.raises(DataError, match="0.png.*not binary.*mask_threshold"):
        load_fundus_records(files, clahe=False)  # strictly two-valued, as other layouts: refused, naming the fix
    dm = _dm(root, val_fraction=0.5, augment=False)
    records = {r.id: r for r in dm._training_records()}
    np.testing.assert_array_equal(records["0"].vessels, (grey > 127).astype(np.uint8))
    fov = records["0"].fov
    assert 0.5 < fov.mean() < 0.95  # the dark corners outside the retina are not counted
    assert records["0"].vessels[fov == 0].sum() <= 0.02 * records["0"].vessels.sum() + 5
    lenient = {r.id: r for r in _dm(root, mask_threshold=20)._training_records()}
    assert lenient["0"].vessels.sum() > records["0"].vessels.sum()  # the option moves the cut


def test_chase_validation_keeps_both_eyes_of_a_child_in_one_split(tmp_path):
    from tests.fixtures.fundus import write_chase_layout

    root = write_chase_layout(tmp_path / "CHASEDB1", children=(1, 2, 3, 4, 5, 6, 11))
    for seed in range(6):
        dm = _dm(root, layout="chase", seed=seed, val_fraction=0.34, augment=False)
        dm.setup("fit")
        train = {r.id[6:8] for r in dm.train_set.records}
        val = {r.id[6:8] for r in dm.val_set.records}
        # today's code split by image: one eye of a child in training, the other in validation
        assert not train & val, f"seed {seed}: children {sorted(train & val)} in both splits"
        assert len(dm.val_set.records) == 4 and len(dm.train_set.records) == 8
    dm.setup("test")
    assert [r.id for r in dm.test_set.records] == ["Image_11L", "Image_11R"]


def test_test_dir_scores_every_annotated_image_of_another_dataset(drive_root, tmp_path):
    from tests.fixtures.fundus import write_chase_layout, write_kaggle_layout

    chase = write_chase_layout(tmp_path / "CHASEDB1")
    dm = _dm(drive_root, test_dir=str(chase))
    dm.setup("test")
    assert sorted(r.id for r in dm.test_set.records) == sorted(f"Image_{c:02d}{e}" for c in (1, 2, 3, 11) for e in "LR")

    # the Kaggle set as distributed numbers train and test images from 0 each ("ids ['0', '1'] occur in
    # its training and its test part; rename one" made it unusable as a test_dir)
    kaggle = write_kaggle_layout(tmp_path / "kaggle", n_train=3, n_test=2)
    dm = _dm(drive_root, test_dir=str(kaggle))
    dm.setup("test")
    assert sorted(r.id for r in dm.test_set.records) == ["test_0", "test_1", "train_0", "train_1", "train_2"]
