"""Data: the embedded digits, image folders streamed through DataLoader workers, prepared
uint8 arrays read by memory map, the train/test split, and the distributed batch order.

Every dataset returns whole batches: ``dataset.batch(indices)`` -> (uint8 images
(b, 3, S, S), int64 labels (b,), skipped files [(path, error)]). The DataLoader calls it
through ``__getitems__`` in its workers, so a batch is decoded in one worker and crosses to
the training process as one tensor.
"""
import functools
import json
import os

import numpy as np
import torch
import torch.nn.functional as tF

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


class _Batches(torch.utils.data.Dataset):
    """Base: ``batch(indices)``; ``labels`` (int64, all images), ``classes``, ``name``,
    ``side`` (images are side x side)."""

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        images, labels, skipped = self.batch([i])
        return images[0], labels[0]

    def __getitems__(self, indices):
        return self.batch(indices)


def collate(batch):
    """The DataLoader's collate: batches arrive whole from ``__getitems__``."""
    return batch


class ImageArray(_Batches):
    """uint8 images (N, 3, S, S): a tensor in memory or a numpy memory map (``prepare``)."""

    def __init__(self, images, labels, classes, name):
        self.images, self.labels, self.classes, self.name = images, labels, list(classes), name
        self.side = int(images.shape[-1])

    def batch(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.images, torch.Tensor):
            images = self.images[torch.from_numpy(idx)]
        else:  # a memory map: reads only these rows
            images = torch.from_numpy(np.ascontiguousarray(self.images[idx]))
        return images, self.labels[torch.from_numpy(idx)], []


def load_digits():
    """scikit-learn's digits: 8x8 intensities 0..16, scaled to 0..255, gray to RGB."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise RuntimeError("the default dataset ships with scikit-learn: pip install scikit-learn "
                           "(or pass --data DIR)") from e
    d = sk_digits()
    images = torch.from_numpy(d.images).mul(255.0 / 16.0).round_().to(torch.uint8)
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    return ImageArray(images, torch.from_numpy(d.target).long(), [str(c) for c in range(10)],
                      "sklearn digits (8x8)")


PHOTOS = "photos"  # --data photos
PHOTO_CROPS, PHOTO_CROP_SIDE, PHOTO_REGIONS = 2048, 128, 3  # per photograph; px; per side
_REGION_NAMES = (("top", "middle", "bottom"), ("left", "centre", "right"))


@functools.lru_cache(maxsize=4)
def load_photos(side, per_photo=PHOTO_CROPS):
    """Colour images with no download: scikit-learn's two sample photographs (china.jpg,
    flower.jpg, 427 x 640) as ``per_photo`` square crops each, PHOTO_CROP_SIDE px at uniform
    places (a fixed seed: the same crops in every run and process), at side x side: each
    photograph resized (antialiased bilinear) by side / PHOTO_CROP_SIDE once, the crops cut
    from it at the scaled places. Label: the photograph and the region of it
    (PHOTO_REGIONS x PHOTO_REGIONS, by the crop's place) the crop comes from, 18 classes:
    telling the two photographs apart is too easy to rank encoders."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise RuntimeError("--data photos ships with scikit-learn (and reads its JPEGs with "
                           "Pillow): pip install scikit-learn pillow") from e
    sample = load_sample_images()
    g = torch.Generator().manual_seed(0)
    c, r = PHOTO_CROP_SIDE, PHOTO_REGIONS
    images, labels, classes = [], [], []
    for k, (photo, path) in enumerate(zip(sample.images, sample.filenames)):
        x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)
        h, w = x.shape[1] - c + 1, x.shape[2] - c + 1  # the places a crop can start
        top, left = torch.randint(h, (per_photo,), generator=g), \
            torch.randint(w, (per_photo,), generator=g)
        labels.append(k * r * r + (top * r // h) * r + left * r // w)
        s = side / c
        small = tF.interpolate(x[None].float(), size=(round(x.shape[1] * s),
                                                      round(x.shape[2] * s)),
                               mode="bilinear", antialias=True, align_corners=False)[0]
        small = small.round_().clamp_(0, 255).to(torch.uint8)
        t = (top * s).round().long().clamp_max(small.shape[1] - side)
        q = (left * s).round().long().clamp_max(small.shape[2] - side)
        images.append(_crop_all(small, t, q, side))
        name = os.path.basename(path)
        classes += [f"{name} {a} {b}" for a in _REGION_NAMES[0] for b in _REGION_NAMES[1]]
    return ImageArray(torch.cat(images), torch.cat(labels), classes,
                      f"sklearn sample photos ({len(sample.images)} x {per_photo} crops of "
                      f"{c} px, {side}x{side})")


def _crop_all(x, top, left, side):
    """(M, 3, side, side): the crops of one image x (3, H, W) at (top[m], left[m])."""
    ar = torch.arange(side)
    rows, cols = (top[:, None] + ar)[:, :, None], (left[:, None] + ar)[:, None, :]
    return x[:, rows, cols].permute(1, 0, 2, 3).contiguous()


def list_folder(root):
    """(class names, [(path, class index)]) of ``root/<class>/<image>``, sorted."""
    if not os.path.isdir(root):
        raise ValueError(f"--data {root!r} is not a folder")
    classes = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
    files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c)))
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    if len(classes) < 2 or not files:
        raise ValueError(f"--data {root!r} needs at least two class sub-folders holding images "
                         f"({', '.join(IMAGE_EXTENSIONS)}); found {len(classes)} folders, "
                         f"{len(files)} images")
    return classes, files


def _fit(x, side):
    """A (3, h, w) uint8 image: shorter side resized to ``side`` (antialiased bilinear),
    centre-cropped to side x side."""
    s = side / min(x.shape[-2:])
    h, w = max(side, round(x.shape[-2] * s)), max(side, round(x.shape[-1] * s))
    if (h, w) != tuple(x.shape[-2:]):
        x = tF.interpolate(x[None].float(), size=(h, w), mode="bilinear", antialias=True,
                           align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
    t, l = (h - side) // 2, (w - side) // 2
    return x[:, t:t + side, l:l + side]


def decode(path, side):
    """One file as a (3, side, side) uint8 tensor: torchvision's JPEG decoder where it is
    installed, Pillow otherwise (JPEGs decoded at a reduced scale when much larger)."""
    if path.lower().endswith((".jpg", ".jpeg")):
        try:
            from torchvision.io import ImageReadMode, decode_jpeg, read_file
        except ImportError:
            pass
        else:
            return _fit(decode_jpeg(read_file(path), mode=ImageReadMode.RGB), side)
    from PIL import Image
    with Image.open(path) as im:
        im.draft("RGB", (side, side))  # JPEG: decode at the smallest scale >= side (no-op else)
        im = im.convert("RGB")
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    return _fit(x, side)


class ImageFolder(_Batches):
    """``root/<class>/<image>`` decoded on demand (in the loader's workers) to side x side.

    A file that cannot be decoded is skipped: its slot in the batch takes the next readable
    file of the listing, and the batch reports it, so the run logs and counts it."""

    def __init__(self, root, side):
        self.classes, self.files = list_folder(root)
        self.labels = torch.tensor([c for _, c in self.files])
        self.side, self.root = int(side), root
        self.name = f"folder {root} ({side}x{side})"

    def batch(self, indices):
        images = torch.empty(len(indices), 3, self.side, self.side, dtype=torch.uint8)
        labels = torch.empty(len(indices), dtype=torch.int64)
        skipped = []
        for k, i in enumerate(indices):
            for j in range(len(self.files)):
                path, label = self.files[(int(i) + j) % len(self.files)]
                try:
                    images[k] = decode(path, self.side)
                except Exception as e:  # unreadable, truncated or not an image
                    skipped.append((path, f"{type(e).__name__}: {e}"[:200]))
                    continue
                labels[k] = label
                break
            else:
                raise RuntimeError(f"no file of {self.root!r} could be decoded")
        return images, labels, skipped


def open_data(data, side, log=print):
    """The dataset behind ``--data``: None (the digits), ``"photos"`` (``load_photos``; a
    folder of that name is ``./photos``), a folder, or a prepared array."""
    if data is None:
        return load_digits()
    if data == PHOTOS:
        return load_photos(side)
    if os.path.isfile(data):
        return open_prepared(data)
    return ImageFolder(data, side)


# ----------------------------------------------------------------------------- prepare

def prepare(root, side, out, workers=0, log=print):
    """Decode ``root``'s images once into ``out`` (a .npy uint8 array (N, 3, side, side),
    read by memory map) and ``out + '.json'`` (labels, classes, skipped files). Unreadable
    files are left out and listed. Returns the metadata."""
    folder = ImageFolder(root, side)
    n = len(folder.files)
    arr = np.lib.format.open_memmap(out + ".partial", mode="w+", dtype=np.uint8,
                                    shape=(n, 3, side, side))
    labels, skipped, kept = [], [], 0
    loader = torch.utils.data.DataLoader(_Singles(folder), batch_size=64, num_workers=workers,
                                         collate_fn=collate)
    done = 0
    for items in loader:
        for image, label, error, path in items:
            if error is None:
                arr[kept] = image.numpy()
                labels.append(label)
                kept += 1
            else:
                skipped.append([path, error])
        done += len(items)
        if done % 5000 < len(items) or done == n:
            log(f"  prepared {done}/{n} images ({len(skipped)} unreadable)")
    arr.flush()
    del arr
    if kept == 0:
        os.remove(out + ".partial")
        raise RuntimeError(f"no file of {root!r} could be decoded")
    if kept == n:
        os.replace(out + ".partial", out)
    else:  # a shorter array: copy the kept rows into a file whose header says so
        full = np.load(out + ".partial", mmap_mode="r")
        final = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8,
                                          shape=(kept, 3, side, side))
        for i in range(0, kept, 4096):
            final[i:i + 4096] = full[i:min(i + 4096, kept)]
        final.flush()
        del final, full
        os.remove(out + ".partial")
    meta = {"source": os.path.abspath(root), "side": side, "images": kept,
            "classes": folder.classes, "labels": labels, "skipped": skipped}
    with open(out + ".json", "w") as f:
        json.dump(meta, f)
    return meta


class _Singles(torch.utils.data.Dataset):
    """Per-file decoding for ``prepare``: (image or None, label, error or None, path)."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder.files)

    def __getitem__(self, i):
        path, label = self.folder.files[i]
        try:
            return decode(path, self.folder.side), label, None, path
        except Exception as e:
            return None, label, f"{type(e).__name__}: {e}"[:200], path


def open_prepared(path):
    """A ``prepare``d array (memory-mapped) with its labels and classes."""
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--data {path!r} is a file but {path + '.json'!r} is missing: a "
                         "prepared array comes from `fastssl prepare DIR --side S --out FILE`")
    images = np.load(path, mmap_mode="r")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or \
            images.shape[0] != len(meta["labels"]):
        raise ValueError(f"{path!r} is not a prepared array (uint8 (N, 3, S, S) matching "
                         f"its labels); got {images.dtype} {images.shape}")
    return ImageArray(images, torch.tensor(meta["labels"], dtype=torch.int64), meta["classes"],
                      f"prepared {path} ({images.shape[-1]}x{images.shape[-1]})")


# ----------------------------------------------------------------------------- order

def split(labels, test_fraction, seed):
    """Stratified train/test indices: each class keeps ``test_fraction`` of its images
    (at least one when it has two or more) for testing."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * test_fraction) if len(idx) > 1 else 0
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class BatchOrder:
    """The distributed batch sampler: each epoch a fresh permutation of ``indices`` (seeded
    by ``seed`` and the epoch, the same on every rank), cut into global batches of
    ``rank_batch * world`` (the last partial one dropped); rank r takes rows
    [r * rank_batch, (r + 1) * rank_batch) of each. So every image is seen at most once per
    epoch across the ranks, and a global batch holds the same images whatever the world
    size. ``set_epoch(epoch, start)`` starts at global batch ``start`` (a resumed run)."""

    def __init__(self, indices, rank_batch, rank=0, world=1, seed=0):
        self.indices, self.rank_batch = torch.as_tensor(indices), int(rank_batch)
        self.rank, self.world, self.seed = int(rank), int(world), int(seed)
        self.epoch, self.start, self.order = 0, 0, None

    @property
    def steps(self):
        return len(self.indices) // (self.rank_batch * self.world)

    def set_epoch(self, epoch, start=0, order=None):
        """Epoch ``epoch`` from global batch ``start``; ``order`` (as many dataset indices as
        ``indices``, the same on every rank) replaces the epoch's permutation."""
        if order is not None and len(order) != len(self.indices):
            raise ValueError(f"an epoch's order needs {len(self.indices)} indices, got "
                             f"{len(order)}")
        self.epoch, self.start = int(epoch), int(start)
        self.order = torch.as_tensor(order).cpu() if order is not None else \
            self.permutation(self.epoch)

    def permutation(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def global_batch(self, step):
        """The dataset indices of global batch ``step`` of the epoch (every rank's rows)."""
        B = self.rank_batch * self.world
        return self.order[step * B:(step + 1) * B]

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        if self.order is None:
            self.set_epoch(self.epoch, self.start)
        B, lo = self.rank_batch * self.world, self.rank * self.rank_batch
        for s in range(self.start, self.steps):
            yield self.order[s * B + lo:s * B + lo + self.rank_batch].tolist()
