"""Data for the main job: datasets held in memory as uint8 tensors, batched SimCLR augmentation, tasks.

* :func:`read_idx` — the IDX format of (Fashion-)MNIST, plain or gzipped, fully validated.
* :func:`load_dataset` — ``fashion-mnist`` (Debian package ``dataset-fashion-mnist`` or ``--data-dir``),
  ``cifar10`` / ``cifar100`` (the python-pickle batches torchvision uses, never downloaded) or a folder of images.
* :class:`BatchedAugment` — SimCLR-style random resized crop, flip, colour jitter and grayscale applied to a
  whole batch at once with per-image random parameters (one ``grid_sample`` for crop + flip, 3×3 colour
  matrices for jitter), so augmenting a task batch costs a small fraction of a GeSSL step on a CPU.
* :class:`TaskSampler` — M tasks of N distinct images per outer step, views [M, 2, N, C, H, W].

Every problem with the data raises :class:`DataError` (a ValueError) naming the file or setting at fault.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}
FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fashionmnist")
BUILTIN_DATASETS = FASHION_MNIST_NAMES + tuple(CIFAR_FILES)
"""``--data`` names read without Pillow; any other value is a folder of images."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# IDX type code -> (torch dtype, bytes per value)
_IDX_TYPES = {0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2), 0x0C: (torch.int32, 4),
              0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8)}


class DataError(ValueError):
    """The dataset cannot be found, read or used as asked (the message names the file or setting)."""


# --- IDX ------------------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an IDX file (``.gz`` or plain) into a tensor of its dtype and shape.

    Layout: two zero bytes, a type code, the number of dimensions D, D big-endian uint32 sizes, then the
    values in big-endian row-major order. Raises :class:`DataError` for a missing, corrupt, truncated or
    over-long file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: corrupt or truncated gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, itemsize = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} is not a valid IDX file (truncated header for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * itemsize
    found = len(raw) - header
    if found < expected:
        raise DataError(f"{path} is truncated: shape {list(shape)} needs {expected} data bytes, found {found}")
    if found > expected:
        raise DataError(f"{path} is corrupt: {found - expected} bytes after the {list(shape)} data")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    if itemsize == 1:
        return data.view(dtype).reshape(shape)
    # big-endian -> native: reverse the bytes of each item
    return data.view(-1, itemsize).flip(1).contiguous().view(dtype).reshape(shape)


# --- datasets -------------------------------------------------------------------------------------

@dataclass
class ImageData:
    """A labelled image dataset in memory. images: uint8 [P, C, H, W]; labels: int64 [P]."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


def load_dataset(name: str, data_dir: str | None = None, image_size: int | None = None, seed: int = 0) -> ImageData:
    """Load ``fashion-mnist``, ``cifar10``, ``cifar100`` or a folder of images (``name`` is its path).

    image_size: resize target (folders: default 32; built-in datasets: native size, others resized).
    """
    key = name.lower()
    if key in FASHION_MNIST_NAMES:
        files = _find_fashion_mnist(data_dir)
        reader = functools.partial(_read_fashion_mnist, files)
    elif key in CIFAR_FILES:
        folder, files = _find_cifar(key, data_dir)
        reader = functools.partial(_read_cifar_batches, key, folder)
    elif Path(name).is_dir():
        return _load_image_folder(Path(name), image_size or 32, seed)
    else:
        raise DataError(f"unknown dataset {name!r}: use fashion-mnist, cifar10, cifar100 or the path of a folder "
                        "of images (one sub-folder per class)")
    if image_size is not None and image_size < 8:
        raise DataError(f"--image-size must be at least 8, got {image_size}")
    # the last built-in dataset read stays in memory, keyed by its files' size and mtime, so repeated runs in
    # one process (gessl-compare) read and decode it once; its tensors are never modified in place
    signature = (tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files), image_size)
    if _CACHE.get("signature") != signature:
        _CACHE.clear()
        data = reader()
        if image_size is not None and image_size != data.image_size:
            data.train_images = _resize_uint8(data.train_images, image_size)
            data.test_images = _resize_uint8(data.test_images, image_size)
        _CACHE.update(signature=signature, data=data)
    return dataclasses.replace(_CACHE["data"], class_names=list(_CACHE["data"].class_names))


_CACHE: dict = {}


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    out = []
    for chunk in images.split(4096):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _fashion_mnist_dirs(data_dir: str | None) -> list[Path]:
    if data_dir is None:
        return [DEBIAN_FASHION_MNIST]
    root = Path(data_dir)
    return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]


def _find_fashion_mnist(data_dir: str | None) -> list[Path]:
    """Paths of the four IDX files (train images, train labels, test images, test labels)."""
    searched = _fashion_mnist_dirs(data_dir)
    for folder in searched:
        found = []
        for stem in FASHION_MNIST_FILES.values():
            found += [c for c in (folder / (stem + ".gz"), folder / stem) if c.is_file()][:1]
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    missing = ", ".join(stem + "[.gz]" for stem in FASHION_MNIST_FILES.values())
    where = ", ".join(str(p) for p in searched)
    hint = " (install them with: apt-get install dataset-fashion-mnist)" if data_dir is None else ""
    raise DataError(f"Fashion-MNIST not found: need {missing} in one of {where}{hint}")


def _read_fashion_mnist(files: list[Path]) -> ImageData:
    arrays = dict(zip(FASHION_MNIST_FILES, (read_idx(p) for p in files)))
    paths = dict(zip(FASHION_MNIST_FILES, files))
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"Fashion-MNIST {split} files disagree: images {list(images.shape)} "
                            f"({paths[f'{split}_images']}), labels {list(labels.shape)} ({paths[f'{split}_labels']})")
        if images.dtype != torch.uint8 or labels.dtype != torch.uint8 or int(labels.max()) >= 10:
            raise DataError(f"{paths[f'{split}_labels']}: labels must be uint8 classes 0-9")
    return ImageData("fashion-mnist",
                     arrays["train_images"].unsqueeze(1), arrays["train_labels"].long(),
                     arrays["test_images"].unsqueeze(1), arrays["test_labels"].long(),
                     list(FASHION_MNIST_CLASSES))


def _find_cifar(key: str, data_dir: str | None) -> tuple[Path, list[Path]]:
    """The folder of the pickled CIFAR batches and their paths; nothing is downloaded."""
    folder_name, files = CIFAR_FILES[key]
    roots = [Path(data_dir)] if data_dir is not None else [Path("data"), Path.home() / "data"]
    for root in roots:
        for folder in (root / folder_name, root):
            if all((folder / f).is_file() for f in files):
                return folder, [folder / f for f in files]
    folder = roots[0] / folder_name
    missing = [f for f in files if not (folder / f).is_file()]
    raise DataError(f"{key} not found: missing {', '.join(missing)} in {folder} (download the python version "
                    f"and pass --data-dir to the folder holding {folder_name}/; nothing is downloaded)")


def _read_cifar_batches(key: str, folder: Path) -> ImageData:
    """Read the pickled CIFAR batches ('data': uint8 [n, 3072], 'labels' or 'fine_labels')."""
    import pickle

    _, files = CIFAR_FILES[key]
    label_key, names_key = (b"labels", b"label_names") if key == "cifar10" else (b"fine_labels", b"fine_label_names")

    def unpickle(name: str) -> dict:
        path = folder / name
        try:
            with open(path, "rb") as f:
                content = pickle.load(f, encoding="bytes")
        except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
            raise DataError(f"cannot read {path}: corrupt or not a CIFAR batch ({type(exc).__name__})") from None
        if not isinstance(content, dict):
            raise DataError(f"{path} is not a CIFAR batch (no dict inside)")
        return content

    def split(names: list[str]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for name in names:
            batch = unpickle(name)
            try:
                data = torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
                target = torch.as_tensor(batch[label_key], dtype=torch.long)
            except (KeyError, RuntimeError, TypeError, ValueError):
                raise DataError(f"{folder / name} is not a {key} batch (missing or malformed data/labels)") from None
            if len(target) != len(data):
                raise DataError(f"{folder / name}: {len(data)} images but {len(target)} labels")
            images.append(data)
            labels.append(target)
        return torch.cat(images), torch.cat(labels)

    train_names = [f for f in files if f.startswith("data_batch")] or ["train"]
    meta = unpickle(files[-1])
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    train_images, train_labels = split(train_names)
    test_images, test_labels = split(["test_batch" if key == "cifar10" else "test"])
    if len(class_names) <= int(max(train_labels.max(), test_labels.max())):
        raise DataError(f"{folder / files[-1]}: {len(class_names)} class names do not cover the labels")
    return ImageData(key, train_images, train_labels, test_images, test_labels, class_names)


def _load_image_folder(root: Path, image_size: int, seed: int) -> ImageData:
    """Images in ``root/<class>/*`` (held-out 20% per class, seeded) or in ``root/train`` + ``root/test|val``."""
    from PIL import Image, UnidentifiedImageError

    def listing(folder: Path) -> dict[str, list[Path]]:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        return {c: sorted(p for p in (folder / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) for c in classes}

    def load(path: Path) -> Tensor:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                scale = image_size / min(img.size)
                img = img.resize((max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale))),
                                 Image.BILINEAR)
                left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
                img = img.crop((left, top, left + image_size, top + image_size))
                return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None

    held_out = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        train_listing, test_listing = listing(root / "train"), listing(held_out)
        if sorted(train_listing) != sorted(test_listing):
            raise DataError(f"{root}: train/ and {held_out.name}/ hold different class folders")
    else:
        full = listing(root)
        generator = torch.Generator().manual_seed(seed)
        train_listing, test_listing = {}, {}
        for cls, paths in full.items():
            order = torch.randperm(len(paths), generator=generator).tolist()
            n_test = len(paths) // 5
            test_listing[cls] = [paths[i] for i in order[:n_test]]
            train_listing[cls] = [paths[i] for i in order[n_test:]]
    classes = sorted(train_listing)
    if len(classes) < 2 or any(not train_listing[c] for c in classes):
        raise DataError(f"{root} must hold at least two class folders, each with images ({', '.join(IMAGE_EXTENSIONS)})")

    def stack(listing_: dict[str, list[Path]]):
        paths = [(p, i) for i, c in enumerate(classes) for p in listing_[c]]
        if not paths:
            return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        images = torch.stack([load(p) for p, _ in paths]).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor([i for _, i in paths], dtype=torch.long)

    return ImageData(str(root), *stack(train_listing), *stack(test_listing), classes)


# --- class splits ---------------------------------------------------------------------------------

def parse_classes(spec, num_classes: int, what: str) -> list[int]:
    """'0-4', '0,2,5-7' or a list of ints -> sorted class indices, checked against ``num_classes``."""
    if isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
    else:
        items = str(spec).split(",")
    classes = set()
    for item in items:
        item = item.strip()
        try:
            if "-" in item:
                lo, hi = (int(v) for v in item.split("-", 1))
                values = range(lo, hi + 1)
            else:
                values = [int(item)]
        except ValueError:
            raise DataError(f"{what}: cannot parse {item!r} (use e.g. 0-4 or 0,2,5-7)") from None
        for v in values:
            if not 0 <= v < num_classes:
                raise DataError(f"{what}: class {v} out of range 0-{num_classes - 1}")
            classes.add(v)
    if not classes:
        raise DataError(f"{what}: no classes given")
    return sorted(classes)


def select_classes(images: Tensor, labels: Tensor, classes: list[int]) -> tuple[Tensor, Tensor]:
    """The images [P', ...] and labels [P'] of the given classes."""
    keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    return images[keep], labels[keep]


# --- augmentation ---------------------------------------------------------------------------------

_GRAY = (0.2989, 0.587, 0.114)   # torchvision's grayscale weights
# RGB <-> YIQ; a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)


class BatchedAugment:
    """SimCLR augmentation of a whole uint8 batch [B, C, H, W] -> normalised float [B, C, H, W].

    Per image, with its own random draw from ``generator``:
    random resized crop (area fraction in ``crop_scale``, aspect ratio in [3/4, 4/3] log-uniform, resized
    back to H×W with bilinear sampling; a sampled side longer than the image is clipped to it) and a
    horizontal flip with probability 1/2 — together one ``affine_grid`` + ``grid_sample``. For RGB images
    only: with probability 0.8 colour jitter (brightness, contrast, saturation ±0.8·s, hue ±0.2·s with
    strength s = ``jitter_strength``; fixed order, clamped to [0, 1] after each; hue as a rotation of the
    YIQ chroma plane), then grayscale with probability 0.2. Gaussian blur is left out, as in SimCLR's
    CIFAR recipe for small images. Finally (x − mean) / std per channel.
    """

    def __init__(self, channels: int, mean, std, crop_scale=(0.2, 1.0), jitter_strength: float = 0.5,
                 jitter_p: float = 0.8, grayscale_p: float = 0.2):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.channels = channels
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_scale = crop_scale
        self.jitter_strength = jitter_strength
        self.jitter_p = jitter_p
        self.grayscale_p = grayscale_p

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """images: uint8 [B, C, H, W] on any device; random parameters drawn on the CPU from ``generator``."""
        batch = images.shape[0]
        x = images.float().div_(255)
        x = self.crop_flip(x, *self.crop_flip_params(batch, generator))
        if self.channels == 3:
            x = self.color(x, *self.color_params(batch, generator))
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def crop_flip_params(self, batch: int, generator: torch.Generator):
        """Per image: crop width and height as fractions of the image, crop centre (cx, cy) in [-1, 1]
        coordinates, and flip (-1 flipped / +1 not); each [B]."""
        u = torch.rand(batch, 5, generator=generator)
        lo, hi = self.crop_scale
        area = lo + (hi - lo) * u[:, 0]
        ratio = (math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]).exp()
        width = (area * ratio).sqrt().clamp(max=1.0)
        height = (area / ratio).sqrt().clamp(max=1.0)
        center_x = (1 - width) * (2 * u[:, 2] - 1)      # the crop stays inside the image
        center_y = (1 - height) * (2 * u[:, 3] - 1)
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        return width, height, center_x, center_y, flip

    @staticmethod
    def crop_flip(x: Tensor, width, height, center_x, center_y, flip) -> Tensor:
        """Resize each image's crop box (centre ± size, in [-1, 1] coordinates) to the full H×W, mirrored
        where flip = -1: one affine_grid + bilinear grid_sample for the batch. x [B, C, H, W]."""
        theta = torch.zeros(x.shape[0], 2, 3)
        theta[:, 0, 0] = width * flip
        theta[:, 0, 2] = center_x
        theta[:, 1, 1] = height
        theta[:, 1, 2] = center_y
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def color_params(self, batch: int, generator: torch.Generator):
        """Per image: brightness, contrast, saturation factors, hue shift (turns), grayscale flag; each [B]."""
        s = self.jitter_strength
        u = torch.rand(batch, 6, generator=generator)
        apply = (u[:, 0] < self.jitter_p).float()      # identity factors where jitter is not applied
        brightness = 1 + apply * 0.8 * s * (2 * u[:, 1] - 1)
        contrast = 1 + apply * 0.8 * s * (2 * u[:, 2] - 1)
        saturation = 1 + apply * 0.8 * s * (2 * u[:, 3] - 1)
        hue = apply * 0.2 * s * (2 * u[:, 4] - 1)
        return brightness, contrast, saturation, hue, u[:, 5] < self.grayscale_p

    @classmethod
    def color(cls, x: Tensor, brightness, contrast, saturation, hue, grayscale) -> Tensor:
        """Colour jitter (in this order, clamped to [0, 1] after each) and grayscale. x: RGB [B, 3, H, W] in [0, 1]."""
        batch, dev = x.shape[0], x.device
        gray_w = torch.tensor(_GRAY, device=dev).view(1, 3, 1, 1)

        def per_image(v: Tensor) -> Tensor:
            return v.to(dev).view(batch, 1, 1, 1)

        x = (x * per_image(brightness)).clamp(0, 1)
        mean_gray = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        c = per_image(contrast)
        x = (c * x + (1 - c) * mean_gray).clamp(0, 1)
        sat = per_image(saturation)
        x = (sat * x + (1 - sat) * (x * gray_w).sum(1, keepdim=True)).clamp(0, 1)
        x = torch.einsum("bij,bjhw->bihw", cls.hue_matrices(hue).to(dev), x).clamp(0, 1)
        gray = (x * gray_w).sum(1, keepdim=True).expand_as(x)
        return torch.where(per_image(grayscale), gray, x)

    @staticmethod
    def hue_matrices(hue: Tensor) -> Tensor:
        """RGB -> RGB matrices [B, 3, 3] rotating the YIQ chroma plane by 2π·hue."""
        angle = 2 * math.pi * hue.double()
        rotation = torch.zeros(hue.shape[0], 3, 3, dtype=torch.float64)
        rotation[:, 0, 0] = 1
        rotation[:, 1, 1] = angle.cos()
        rotation[:, 1, 2] = -angle.sin()
        rotation[:, 2, 1] = angle.sin()
        rotation[:, 2, 2] = angle.cos()
        return (torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ).float()


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [P, C, H, W], in [0, 1] units."""
    x = images[:10000].double() / 255
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp(min=1e-3).tolist()


# --- tasks ----------------------------------------------------------------------------------------

class TaskSampler:
    """Outer-step batches of M tasks × N distinct images, drawn without replacement within an epoch.

    An epoch is one pass over a random permutation of the images, cut into ``steps_per_epoch`` groups of
    M·N; ``views(step_images, generator)`` makes the two augmented views of every image.
    """

    def __init__(self, images: Tensor, num_tasks: int, task_size: int, augment: BatchedAugment,
                 steps_per_epoch: int | None = None):
        per_step = num_tasks * task_size
        if per_step > images.shape[0]:
            raise DataError(f"--tasks {num_tasks} x --task-size {task_size} = {per_step} images per step, but the "
                            f"pre-training set holds only {images.shape[0]}")
        self.images = images
        self.num_tasks, self.task_size = num_tasks, task_size
        self.augment = augment
        full = images.shape[0] // per_step
        self.steps_per_epoch = min(full, steps_per_epoch) if steps_per_epoch else full

    def epoch(self, generator: torch.Generator):
        """Yield uint8 image groups [M, N, C, H, W] for one epoch."""
        order = torch.randperm(self.images.shape[0], generator=generator)
        per_step = self.num_tasks * self.task_size
        for step in range(self.steps_per_epoch):
            idx = order[step * per_step:(step + 1) * per_step]
            yield self.images[idx].view(self.num_tasks, self.task_size, *self.images.shape[1:])

    def views(self, groups: Tensor, generator: torch.Generator, device=None) -> Tensor:
        """uint8 [M, N, C, H, W] -> augmented views float [M, 2, N, C, H, W] (one batched augmentation)."""
        m, n = groups.shape[:2]
        both = groups.to(device).unsqueeze(1).expand(m, 2, *groups.shape[1:]).reshape(m * 2 * n, *groups.shape[2:])
        return self.augment(both, generator).view(m, 2, n, *groups.shape[2:])
