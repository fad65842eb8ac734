"""sample.py's image-to-image inputs: files and directories read in order; wrong size, channels or
mode, missing paths and bad masks are one-line UserErrors."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.image_inputs import read_images, read_mask
from ldm.utils.errors import UserError


def save(path, array, mode=None):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)
    return path


def test_reads_file_and_directory_in_order(tmp_path):
    save(tmp_path / "b.png", np.full((8, 8), 255))
    save(tmp_path / "a.png", np.zeros((8, 8)))
    (tmp_path / "notes.txt").write_text("not an image")
    images, files = read_images(tmp_path, "input", channels=1, size=8)
    assert [f.name for f in files] == ["a.png", "b.png"]
    assert images.shape == (2, 1, 8, 8)
    assert torch.equal(images[0], torch.full((1, 8, 8), -1.0))
    assert torch.equal(images[1], torch.full((1, 8, 8), 1.0))
    rgb = save(tmp_path / "rgb.png", np.zeros((8, 8, 3)))
    assert read_images(rgb, "input", channels=3, size=8)[0].shape == (1, 3, 8, 8)


@pytest.mark.parametrize(
    ("array", "mode", "channels", "size", "message"),
    [
        (np.zeros((16, 16)), None, 1, 8, "is 16x16 but the model takes 8x8"),
        (np.zeros((8, 8, 3)), None, 1, 8, "has mode RGB but the model takes 1-channel"),
        (np.zeros((8, 8)), None, 3, 8, "has mode L but the model takes 3-channel"),
        (np.zeros((8, 8, 4)), "RGBA", 3, 8, "has mode RGBA"),
    ],
)
def test_wrong_size_channels_or_mode_is_one_line(tmp_path, array, mode, channels, size, message):
    path = save(tmp_path / "x.png", array, mode)
    with pytest.raises(UserError, match=message) as err:
        read_images(path, "input", channels, size)
    assert "\n" not in str(err.value)


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_images(tmp_path / "nope.png", "input", 1, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="directory without images"):
        read_images(tmp_path / "empty", "input", 1, 8)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="not a readable image"):
        read_images(tmp_path / "bad.png", "input", 1, 8)


def test_mask_white_is_fill(tmp_path):
    array = np.zeros((8, 8))
    array[2:4, 3:6] = 255
    array[0, 0] = 100  # grey below the threshold: keep
    mask = read_mask(save(tmp_path / "m.png", array), size=8)
    assert mask.shape == (1, 8, 8) and mask.sum() == 6 and mask[0, 2, 3] == 1 and mask[0, 0, 0] == 0
    with pytest.raises(UserError, match="is 8x8 but the image is 16x16"):
        read_mask(tmp_path / "m.png", size=16)
    with pytest.raises(UserError, match="has mode RGB"):
        read_mask(save(tmp_path / "rgb.png", np.zeros((8, 8, 3))), size=8)
