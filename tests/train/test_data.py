"""IDX reader, dataset loaders, class splits, batched augmentation and task sampling."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gessl_ext.train.data import (DEBIAN_FASHION_MNIST, BatchedAugment, DataError, TaskSampler, load_dataset,
                                  parse_classes, read_idx)
from idx_files import write_idx

HAVE_FASHION = (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="apt-get install dataset-fashion-mnist")


# --- IDX ------------------------------------------------------------------------------------------

@needs_fashion
def test_idx_reader_matches_known_fashion_mnist_pixels():
    images = read_idx(DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,)
    first = images[0]
    # values read once from the file with an independent reader (gzip + numpy)
    assert first[3, 10:20].tolist() == [0, 0, 1, 0, 0, 13, 73, 0, 0, 1]
    assert first[7, 10:20].tolist() == [0, 1, 0, 69, 207, 223, 218, 216, 216, 163]
    assert int(first.sum()) == 76247 and int(first.max()) == 255 and first[14, 25] == 255
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    test_labels = read_idx(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert test_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
                                        (np.float32, 0x0D), (np.float64, 0x0E)])
def test_idx_reader_round_trips_every_type(tmp_path, dtype, code, compress):
    rng = np.random.default_rng(3)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / ("x.idx" + (".gz" if compress else ""))
    write_idx(path, array, code, compress)
    out = read_idx(path)
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out.numpy(), array)


@pytest.mark.parametrize("damage,match", [
    (lambda raw: raw[:-7], "truncated"),
    (lambda raw: raw + b"\x00\x01", "after the"),
    (lambda raw: b"\x01" + raw[1:], "not an IDX file"),
    (lambda raw: raw[:2] + b"\x07" + raw[3:], "not an IDX file"),
    (lambda raw: raw[:6], "truncated header"),
    (lambda raw: b"", "not an IDX file"),
])
def test_idx_reader_rejects_damaged_files(tmp_path, damage, match):
    good = tmp_path / "good.idx"
    write_idx(good, np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08, False)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(DataError, match=match) as info:
        read_idx(bad)
    assert str(bad) in str(info.value)


def test_idx_reader_rejects_corrupt_and_truncated_gzip(tmp_path):
    good = tmp_path / "good.idx.gz"
    write_idx(good, np.arange(4000, dtype=np.int32), 0x0C, True)
    raw = good.read_bytes()
    cut = tmp_path / "cut.idx.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="gzip"):
        read_idx(cut)
    junk = tmp_path / "junk.idx.gz"
    junk.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="gzip"):
        read_idx(junk)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing.idx")


# --- datasets -------------------------------------------------------------------------------------

def fake_fashion_dir(tmp_path, n_train=40, n_test=20, corrupt=None):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, array in files.items():
        write_idx(tmp_path / (name + ".gz"), array, 0x08, True)
    if corrupt:
        path = tmp_path / (corrupt + ".gz")
        path.write_bytes(path.read_bytes()[:-30])
    return files


def test_fashion_mnist_from_a_data_dir_and_its_errors(tmp_path):
    files = fake_fashion_dir(tmp_path)
    data = load_dataset("fashion-mnist", str(tmp_path))
    assert data.train_images.shape == (40, 1, 28, 28) and data.test_images.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(data.train_images[:, 0].numpy(), files["train-images-idx3-ubyte"])
    assert data.train_labels.tolist() == list(np.arange(40) % 10)
    resized = load_dataset("fashion-mnist", str(tmp_path), image_size=14)
    assert resized.train_images.shape == (40, 1, 14, 14)
    ref = F.interpolate(data.train_images[:3].float(), size=(14, 14), mode="bilinear", antialias=True)
    assert torch.equal(resized.train_images[:3], ref.round().clamp(0, 255).to(torch.uint8))

    with pytest.raises(DataError, match="Fashion-MNIST not found.*t10k-labels"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    fake_fashion_dir(broken, corrupt="t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match="t10k-images"):
        load_dataset("fashion-mnist", str(broken))
    with pytest.raises(DataError, match="unknown dataset 'mnist-x'"):
        load_dataset("mnist-x")


@needs_fashion
def test_fashion_mnist_default_location():
    data = load_dataset("fashion-mnist")
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10 and torch.bincount(data.test_labels).tolist() == [1000] * 10


def test_cifar10_reader_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="missing data_batch_1.*test_batch.*batches.meta"):
        load_dataset("cifar10", str(tmp_path))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"labels": [0, 1, 2, 9]}
        pickle.dump(batches[name], open(folder / name, "wb"))
    pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, open(folder / "batches.meta", "wb"))
    data = load_dataset("cifar10", str(tmp_path))
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(data.train_images[4].numpy().reshape(-1), batches["data_batch_2"][b"data"][0])
    assert data.class_names[9] == "c9" and data.test_labels.tolist() == [0, 1, 2, 9]
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_batch.*corrupt"):
        load_dataset("cifar10", str(tmp_path))


def test_image_folder_split_and_corrupt_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_dataset(str(tmp_path), image_size=16)
    assert data.class_names == ["cat", "dog"]
    assert data.train_images.shape == (8, 3, 16, 16) and data.test_images.shape == (2, 3, 16, 16)
    assert sorted(data.test_labels.tolist()) == [0, 1]
    (tmp_path / "dog" / "5.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="5.png"):
        load_dataset(str(tmp_path), image_size=16)


def test_parse_classes():
    assert parse_classes("0-4", 10, "x") == [0, 1, 2, 3, 4]
    assert parse_classes("7,0-2, 9", 10, "x") == [0, 1, 2, 7, 9]
    assert parse_classes([3, "5"], 10, "x") == [3, 5]
    with pytest.raises(DataError, match="class 10 out of range"):
        parse_classes("8-10", 10, "--train-classes")
    with pytest.raises(DataError, match="cannot parse 'a'"):
        parse_classes("1,a", 10, "--train-classes")


# --- augmentation ---------------------------------------------------------------------------------

def reference_crop(image: torch.Tensor, width, height, cx, cy, flip) -> torch.Tensor:
    """Per-pixel float64 reference: output pixel (i, j) samples the crop box at its own relative position."""
    channels, h, w = image.shape
    out = torch.empty(channels, h, w, dtype=torch.float64)
    img = image.double()
    for i in range(h):
        for j in range(w):
            u = ((2 * j + 1) / w - 1) * flip      # output pixel centre in [-1, 1], mirrored when flipped
            v = (2 * i + 1) / h - 1
            x = ((cx + width * u + 1) * w - 1) / 2  # input pixel coordinate
            y = ((cy + height * v + 1) * h - 1) / 2
            x, y = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
            x0, y0 = int(x), int(y)
            x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
            fx, fy = x - x0, y - y0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * img[:, y0, x0] + fx * img[:, y0, x1])
                            + fy * ((1 - fx) * img[:, y1, x0] + fx * img[:, y1, x1]))
    return out


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(5)
    aug = BatchedAugment(3, [0.0] * 3, [1.0] * 3, crop_scale=(0.2, 1.0))
    x = torch.rand(6, 3, 11, 9, generator=g)
    params = aug.crop_flip_params(6, g)
    out = aug.crop_flip(x, *params)
    for b in range(6):
        ref = reference_crop(x[b], *(float(p[b]) for p in params))
        torch.testing.assert_close(out[b].double(), ref, atol=1e-5, rtol=0)


def test_crop_params_follow_the_simclr_distribution():
    aug = BatchedAugment(1, [0.0], [1.0], crop_scale=(0.3, 0.9))
    width, height, cx, cy, flip = aug.crop_flip_params(20000, torch.Generator().manual_seed(0))
    area, ratio = width * height, width / height
    inside = (width < 1) & (height < 1)
    assert float(inside.float().mean()) > 0.9
    assert bool(((area[inside] >= 0.3 - 1e-6) & (area[inside] <= 0.9 + 1e-6)).all())
    assert bool(((ratio[inside] >= 0.75 - 1e-6) & (ratio[inside] <= 4 / 3 + 1e-6)).all())
    assert abs(float(ratio[inside].log().mean())) < 0.01           # log-uniform ratio, symmetric about 1
    assert bool(((cx.abs() <= 1 - width + 1e-6) & (cy.abs() <= 1 - height + 1e-6)).all())
    assert abs(float((flip < 0).float().mean()) - 0.5) < 0.02
    assert abs(float(area[inside].mean()) - 0.6) < 0.02       # uniform area on [0.3, 0.9]


def test_color_matches_torchvision_per_image():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 8, 8, generator=g)
    brightness = torch.tensor([1.3, 0.7, 1.0, 0.9, 1.2])
    contrast = torch.tensor([0.8, 1.2, 1.0, 1.3, 0.6])
    saturation = torch.tensor([1.2, 0.6, 1.0, 0.8, 1.4])
    zero_hue = torch.zeros(5)
    gray = torch.tensor([False, False, False, True, False])
    out = BatchedAugment.color(x, brightness, contrast, saturation, zero_hue, gray)
    for b in range(5):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[b], float(brightness[b])),
                                                      float(contrast[b])), float(saturation[b]))
        if gray[b]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)


def test_hue_rotation_keeps_luma_and_composes():
    hue = torch.tensor([0.0, 0.1, -0.07, 0.25])
    m = BatchedAugment.hue_matrices(hue).double()
    torch.testing.assert_close(m[0], torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    torch.testing.assert_close(luma @ m, luma.expand(4, 3), atol=1e-6, rtol=0)
    combined = BatchedAugment.hue_matrices(torch.tensor([0.03])).double()[0]
    total = BatchedAugment.hue_matrices(torch.tensor([0.06])).double()[0]    # 0.1 + 0.03 - 0.07
    torch.testing.assert_close(m[1] @ combined @ m[2], total, atol=1e-6, rtol=0)
    assert not torch.allclose(m[1], m[0], atol=1e-2)


def test_augment_is_seeded_normalised_and_per_image():
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    aug = BatchedAugment(3, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    a = aug(images, torch.Generator().manual_seed(7))
    b = aug(images, torch.Generator().manual_seed(7))
    c = aug(images, torch.Generator().manual_seed(8))
    assert a.shape == images.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same image twice gets two different views
    same = aug(images[:1].expand(2, -1, -1, -1), torch.Generator().manual_seed(0))
    assert not torch.allclose(same[0], same[1])
    # normalisation: undoing it gives values in [0, 1]
    raw = a * aug.std + aug.mean
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5


def test_task_sampler_views_and_epochs():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 8, 8).contiguous()
    aug = BatchedAugment(1, [0.0], [1.0], crop_scale=(1.0, 1.0))
    sampler = TaskSampler(images, num_tasks=3, task_size=4, augment=aug)
    assert sampler.steps_per_epoch == 3
    g = torch.Generator().manual_seed(0)
    groups = list(sampler.epoch(g))
    seen = torch.cat([grp[:, :, 0, 0, 0].reshape(-1) for grp in groups])
    assert len(set(seen.tolist())) == 36            # no image twice within an epoch
    views = sampler.views(groups[0], g)
    assert views.shape == (3, 2, 4, 1, 8, 8)
    # constant images: both views of image (m, i) equal its value / 255
    expected = groups[0][:, :, 0, 0, 0].float() / 255
    torch.testing.assert_close(views[:, 0, :, 0, 4, 4], expected)
    torch.testing.assert_close(views[:, 1, :, 0, 4, 4], expected)
    with pytest.raises(DataError, match="only 40"):
        TaskSampler(images, num_tasks=3, task_size=14, augment=aug)
    assert TaskSampler(images, 1, 4, aug, steps_per_epoch=2).steps_per_epoch == 2
