"""Images as cameras and editors write them: EXIF orientation, grey + alpha class maps, lossy masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from octlightning.data.formats.mirage import read_value_mask
from octlightning.data.io import oriented_size, read_binary_mask, read_image, read_mask
from octlightning.data.mask_folder import MaskFolderDataModule, MaskFolderDataset
from octlightning.errors import DataError
from tests.fixtures.isic import write_isic_layout

ORIENTATION = 0x0112


def photo_with_lesion(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB photo (as displayed) with a dark lesion in its top-left part, and the lesion mask {0, 1}."""
    image = np.full((h, w, 3), 200, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[4 : h // 2, 3 : w // 2 + 4] = 1
    image[mask == 1] = 40
    return image, mask


def save_as_the_camera_did(display: np.ndarray, path, quality: int = 95) -> None:
    """Store the sensor's pixels (the picture turned by 90 degrees) with EXIF orientation 6, which
    tells viewers to turn it back: what phones and many dermatoscope cameras write."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(display).transpose(Image.Transpose.ROTATE_90).save(path, quality=quality, exif=exif)


def test_exif_orientation_is_applied_to_the_image_as_viewers_show_it(tmp_path):
    display, mask = photo_with_lesion(40, 40)  # square: a misregistration raises no size error
    save_as_the_camera_did(display, tmp_path / "photo.jpg")
    read = read_image(tmp_path / "photo.jpg")
    # today's code returned the sensor's pixels: the lesion elsewhere than its mask says, silently
    assert read[mask == 1].mean() < 80 and read[mask == 0].mean() > 160
    assert oriented_size(tmp_path / "photo.jpg") == (40, 40)


def test_a_turned_photo_stays_registered_with_its_mask_in_the_datamodule(tmp_path):
    root = write_isic_layout(tmp_path / "isic")
    display, mask = photo_with_lesion(36, 52)  # not square: also the header size must be the displayed one
    sid = "ISIC_0000000"
    save_as_the_camera_did(display, root / "ISIC2018_Task1-2_Training_Input" / f"{sid}.jpg")
    Image.fromarray(mask * 255).save(root / "ISIC2018_Task1_Training_GroundTruth" / f"{sid}_segmentation.png")
    dm = MaskFolderDataModule(str(root), batch_size=2, num_workers=0, image_size=[36, 52], val_fraction=0.3)
    pair = next(p for split in dm.splits().values() for p in split if p.id == sid)
    assert pair.size == (36, 52)
    image, decoded_mask = MaskFolderDataset([pair], (36, 52)).decode(pair)[:2]
    np.testing.assert_array_equal(decoded_mask, mask)
    assert image[mask == 1].mean() < 80 and image[mask == 0].mean() > 160


def test_exif_orientation_of_a_jpeg_mask_is_applied_alike(tmp_path):
    display, mask = photo_with_lesion(40, 40)
    save_as_the_camera_did(np.repeat(mask[..., None] * 255, 3, axis=2), tmp_path / "mask.jpg", quality=90)
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.jpg", 127), mask)


def test_grey_alpha_class_maps_read_like_rgba_ones(tmp_path):
    values = np.array([[0, 80, 160], [255, 80, 0]], np.uint8)
    alpha = np.array([[255, 255, 0], [255, 128, 255]], np.uint8)  # an editor's transparency
    Image.fromarray(np.stack([values, alpha], -1), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(np.stack([values, values, values, alpha], -1), mode="RGBA").save(tmp_path / "rgba.png")
    # today's code failed on the two-channel array (IndexError), instead of dropping the alpha channel
    np.testing.assert_array_equal(read_value_mask(tmp_path / "la.png"), values)
    np.testing.assert_array_equal(read_value_mask(tmp_path / "rgba.png"), values)


def test_a_non_binary_mask_error_names_the_mask_threshold_option(tmp_path):
    Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(tmp_path / "lossy.png")
    with pytest.raises(DataError, match=r"lossy.png: mask is not binary.*mask_threshold"):
        read_binary_mask(tmp_path / "lossy.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "lossy.png", 127), [[0, 1, 1]])
