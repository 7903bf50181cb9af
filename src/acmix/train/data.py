"""Datasets and loaders: the embedded digits (scikit-learn) and image folders, with timm's transforms and Mixup.

- :class:`DigitsDataset`: scikit-learn's bundled handwritten digits (1,797 real 8 x 8 grey images, 10 classes,
  values 0..16), split once with a fixed stratified 80/20 split (``random_state=0``): 1,437 train, 360 val.
- :class:`ImageFolderDataset`: ``root/<split>/<class>/<image>`` (the ImageNet layout), checked before training
  (empty class folders, empty splits, validation classes the training split lacks), decoded with PIL and
  transformed with :func:`timm.data.create_transform`. Unreadable files raise an error naming the file, or with
  ``skip_bad=True`` are dropped from the batch and reported per epoch.
- :class:`ShardSampler`: the epoch's order is ``randperm(n)`` seeded by ``seed + epoch`` (as
  :class:`torch.utils.data.DistributedSampler`), sharded by rank, and can start part-way into an epoch, so an
  interrupted run resumes on exactly the batches it had not seen.
- :func:`make_loader`: each sample's random augmentation is seeded from ``(seed, epoch, sample index)`` (the
  Python, NumPy and torch CPU generators, restored afterwards), so it is the same whichever worker or process
  draws the sample and whether or not the epoch was interrupted: training and resuming are exact for any
  ``--workers``. Errors raised while loading a batch, in a worker or not, arrive as one line
  (:class:`DataLoaderError`, or the ``ValueError`` naming an unreadable image).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

_logger = logging.getLogger(__name__)

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "DataBundle",
    "DataLoaderError",
    "DigitsDataset",
    "ImageFolderDataset",
    "ShardSampler",
    "build_data",
    "collate_skip",
    "digits_split",
    "scan_image_folder",
]

DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)
_DIGITS_SEED = 0
_DIGITS_VAL_FRACTION = 0.2


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed stratified split: (train images (N, 1, 8, 8) in [0, 1], train labels, val images, val labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(labels)).numpy()
    tr, va = train_test_split(
        idx, test_size=_DIGITS_VAL_FRACTION, stratify=digits.target, random_state=_DIGITS_SEED, shuffle=True
    )
    tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
    return images[tr_t], labels[tr_t], images[va_t], labels[va_t]


class DigitsDataset(Dataset):
    """One split of the embedded digits as normalised (1, S, S) tensors (S = ``input_size``, 8 natively).

    Args:
        split: ``"train"`` or ``"val"``.
        shift: training augmentation: a random translation by up to ``shift`` pixels (zero fill), drawn from
            torch's global generator (seeded per sample by :func:`make_loader`).
        input_size: output side; other than 8 resizes bilinearly.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", *, shift: int = 0, input_size: int = 8) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
        xtr, ytr, xva, yva = digits_split()
        self.images, self.targets = (xtr, ytr) if split == "train" else (xva, yva)
        self.shift, self.input_size, self.split = shift, input_size, split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]  # (1, 8, 8) in [0, 1]
        if self.shift > 0:
            s = self.shift
            dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,)))
            img = F.pad(img, (s, s, s, s))[:, s + dy : s + dy + 8, s + dx : s + dx + 8]  # (1, 8, 8)
        if self.input_size != 8:
            img = F.interpolate(img[None], size=self.input_size, mode="bilinear", align_corners=False)[0]
        return (img - DIGITS_MEAN[0]) / DIGITS_STD[0], int(self.targets[i])


def _img_extensions() -> tuple[str, ...]:
    from timm.data.readers.img_extensions import get_img_extensions

    return tuple(sorted(get_img_extensions(as_set=True)))


def scan_image_folder(split_dir: Path, class_to_idx: dict[str, int] | None = None) -> tuple[list, list[str]]:
    """List ``(path, target)`` of ``split_dir/<class>/<file>``; raise ValueError on empty classes/splits.

    Returns ``(samples, classes)``; ``classes`` sorted. With ``class_to_idx`` (the training split's), a class
    missing from it raises ValueError before training starts.
    """
    if not split_dir.is_dir():
        raise FileNotFoundError(f"dataset split folder not found: {split_dir}")
    exts = _img_extensions()
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image files>)")
    classes = [p.name for p in class_dirs]
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    else:
        missing = [c for c in classes if c not in class_to_idx]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise ValueError(f"{split_dir}: classes not in the training split: {shown}")
    samples: list[tuple[str, int]] = []
    for cdir in class_dirs:
        files = sorted(
            p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
        )
        if not files:
            raise ValueError(f"{cdir}: empty class folder (no files with extensions {', '.join(exts)})")
        samples.extend((str(p), class_to_idx[cdir.name]) for p in files)
    return samples, classes


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` read with PIL, transformed by ``transform`` (timm's).

    Args:
        split_dir: the split's folder.
        transform: callable PIL image -> tensor.
        class_to_idx: the class indices to use (the training split's) or None to number this split's classes.
        img_mode: PIL mode, ``"RGB"`` or ``"L"`` (one input channel).
        skip_bad: on an unreadable file, return None (dropped by :func:`collate_skip`) instead of raising.
    """

    def __init__(
        self,
        split_dir: str | Path,
        transform: Callable[[Any], torch.Tensor] | None = None,
        *,
        class_to_idx: dict[str, int] | None = None,
        img_mode: str = "RGB",
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(split_dir)
        self.samples, classes = scan_image_folder(self.root, class_to_idx)
        self.classes = classes if class_to_idx is None else sorted(class_to_idx, key=lambda c: class_to_idx[c])
        self.class_to_idx = class_to_idx or {c: i for i, c in enumerate(classes)}
        self.transform, self.img_mode, self.skip_bad = transform, img_mode, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Any:
        from PIL import Image, UnidentifiedImageError

        path, _ = self.samples[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert(self.img_mode)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"cannot read image {path}: {exc} (use --skip-bad-images to skip such files)") from None

    def __getitem__(self, i: int) -> Any:
        try:
            img = self.load(i)
        except ValueError:
            if not self.skip_bad:
                raise
            return None, self.samples[i][0]
        x = self.transform(img) if self.transform is not None else img
        return x, self.samples[i][1]


def collate_skip(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack ``(tensor, target)`` pairs, dropping unreadable samples ``(None, path)``; returns (x, y, skipped)."""
    good = [b for b in batch if b[0] is not None]
    skipped = [b[1] for b in batch if b[0] is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    x = torch.stack([b[0] for b in good])  # (B, C, H, W)
    y = torch.tensor([int(b[1]) for b in good], dtype=torch.long)
    return x, y, skipped


class ShardSampler(Sampler[int]):
    """Epoch-seeded order (``seed + epoch``), sharded ``rank::world``, optionally starting part-way in.

    Training (``shuffle=True``) pads the order to a multiple of ``world`` like DistributedSampler, so every rank
    sees the same number of samples; evaluation (``shuffle=False``) shards without padding (exact metrics
    after a sum over ranks).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use epoch ``epoch``'s order, skipping this rank's first ``start`` samples."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            total = math.ceil(self.n / self.world) * self.world
            order += order[: total - self.n]
        else:
            order = list(range(self.n))
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


@dataclass
class DataBundle:
    """What the trainer needs from the data: datasets, loaders' sampler, class names, channels, sizes."""

    train: Dataset
    val: Dataset
    classes: list[str]
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def eval_transform(input_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float, interpolation: str):
    """timm's evaluation transform (resize input_size / crop_pct, centre crop, normalise)."""
    from timm.data import create_transform

    return create_transform(
        input_size,
        is_training=False,
        mean=tuple(mean),
        std=tuple(std),
        crop_pct=crop_pct,
        interpolation=interpolation or "bilinear",
    )


def data_eval_transform(data: Mapping[str, Any], default_crop_pct: float):
    """:func:`eval_transform` of a data config (a checkpoint's ``data``: ``input_size``, ``mean``, ``std``, and
    ``crop_pct`` and ``interpolation`` where it has them, else ``default_crop_pct`` and bilinear)."""
    return eval_transform(
        int(data["input_size"]),
        data["mean"],
        data["std"],
        float(data.get("crop_pct", default_crop_pct)),
        str(data.get("interpolation", "bilinear")),
    )


def image_mode(in_chans: int) -> str:
    """PIL mode of the images for a model with ``in_chans`` input channels: ``"L"`` for one, else ``"RGB"``."""
    return "L" if in_chans == 1 else "RGB"


def build_data(cfg: Any, data_cfg: dict[str, Any], in_chans: int) -> DataBundle:
    """Datasets for ``cfg`` (a TrainConfig): digits when ``cfg.data_dir`` is None, else an image folder.

    ``data_cfg`` holds timm's resolved ``input_size``/``mean``/``std``/``crop_pct``/``interpolation``.
    """
    if cfg.data_dir is None:
        size = int(cfg.input_size or 8)
        return DataBundle(
            DigitsDataset("train", shift=cfg.shift_aug, input_size=size),
            DigitsDataset("val", input_size=size),
            list(DigitsDataset.classes),
            1,
            size,
            DIGITS_MEAN,
            DIGITS_STD,
            1.0,
            "bilinear",
            "digits",
        )
    from timm.data import create_transform

    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir not found: {root}")
    size = int(data_cfg["input_size"][-1])
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    if len(mean) != in_chans:
        mean, std = (mean * in_chans)[:in_chans], (std * in_chans)[:in_chans]
    interp = cfg.interpolation or data_cfg.get("interpolation", "bilinear")
    crop_pct = float(cfg.crop_pct or data_cfg.get("crop_pct", 0.875))
    train_tf = create_transform(
        size,
        is_training=True,
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=interp,
        mean=mean,
        std=std,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    img_mode = image_mode(in_chans)
    train: Any
    val: Any
    train = ImageFolderDataset(root / cfg.train_split, train_tf, img_mode=img_mode, skip_bad=cfg.skip_bad_images)
    val = ImageFolderDataset(
        root / cfg.val_split,
        eval_transform(size, mean, std, crop_pct, interp),
        class_to_idx=train.class_to_idx,
        img_mode=img_mode,
        skip_bad=cfg.skip_bad_images,
    )
    _logger.info(
        "image folder %s: %d train / %d val images, %d classes", root, len(train), len(val), len(train.classes)
    )
    return DataBundle(train, val, train.classes, in_chans, size, mean, std, crop_pct, interp, str(root))


class DataLoaderError(RuntimeError):
    """Loading a batch failed (a data-loader worker died, or a dataset/transform raised); one line, with the cause."""


#: torch re-raises a worker's exception as ``Caught <Type> in DataLoader worker process <n>.\nOriginal Traceback...``
_WORKER_CAUGHT = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)")
#: raised in the main process (not caught in a worker) when a worker's pipe breaks
_WORKER_PIPE_ERRORS = (ConnectionResetError, BrokenPipeError, EOFError)


def _one_line(exc: Exception, workers: int = 0) -> Exception:
    """The one-line form of an error raised while loading a batch (same text with 0 or N workers)."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and _WORKER_CAUGHT.match(exc.args[0]):
        text = exc.args[0].strip()  # str() of a KeyError is the repr of its message
    caught = _WORKER_CAUGHT.match(text)
    if caught:  # the worker's own last line, e.g. "ValueError: cannot read image ..."
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        last = lines[-1] if lines else caught.group(1)
        text = last.split(": ", 1)[1] if last.startswith(caught.group(1) + ": ") else last
    elif "DataLoader worker" in text or (workers > 0 and isinstance(exc, _WORKER_PIPE_ERRORS)):
        # killed (out of memory, a signal) or crashed in native code; a worker killed while it sends a batch can
        # surface as a reset of the pipe the main process was reading
        first = text.splitlines()[0] if text else type(exc).__name__
        return DataLoaderError(
            f"a data-loader worker died: {first} (out of memory, killed, or a crash in native code); "
            "rerun with --workers 0 to see the error in the main process"
        )
    if isinstance(exc, ValueError):
        return ValueError(text.splitlines()[0] if text else type(exc).__name__)
    name = caught.group(1) if caught else type(exc).__name__
    first = text.splitlines()[0] if text else ""
    return DataLoaderError(f"loading a batch failed: {name}: {first}")


class _OneLineErrors:
    """Iterator wrapper: every loading error becomes :func:`_one_line`'s form (the cause stays chained)."""

    def __init__(self, it: Any) -> None:
        self._it = it

    def __iter__(self) -> _OneLineErrors:
        return self

    def __len__(self) -> int:
        return len(self._it)

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as exc:
            self._close()
            if isinstance(exc, ValueError) and "\n" not in str(exc) and not _WORKER_CAUGHT.match(str(exc)):
                raise  # already one line (the 0-worker form)
            raise _one_line(exc, getattr(self._it, "_num_workers", 0)) from exc

    def _close(self) -> None:
        """Stop the workers now, not when the traceback that holds this iterator is freed."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()


class _Loader(DataLoader):
    """:class:`~torch.utils.data.DataLoader` whose iterators report loading errors in one line."""

    def __iter__(self) -> Any:  # type: ignore[override]
        return _OneLineErrors(super().__iter__())


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return _mix64(_mix64(_mix64(seed & _MASK64) ^ epoch) ^ index)


class _PerSampleSeed(Dataset):
    """``dataset[i]`` with the Python, NumPy and torch CPU generators seeded from ``(sampler seed, epoch, i)``:
    augmentation is independent of worker, process, order and interruptions. In the main process (no workers)
    the generators' states are saved before a batch and restored after it, so the training's own random
    streams (dropout, Mixup) do not depend on the data either."""

    def __init__(self, dataset: Dataset, sampler: ShardSampler) -> None:
        self.dataset, self.sampler = dataset, sampler

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:  # torch's fetcher calls this once per batch
        from torch.utils.data import get_worker_info

        saved = None
        if get_worker_info() is None:
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            out = []
            for i in indices:
                s = _sample_seed(self.sampler.seed, self.sampler.epoch, i)
                random.seed(s)
                np.random.seed(s & 0xFFFFFFFF)
                torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed would also reseed CUDA
                out.append(self.dataset[i])
            return out
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def make_loader(
    dataset: Dataset,
    sampler: ShardSampler,
    batch_size: int,
    *,
    workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over ``dataset`` in ``sampler``'s order: per-sample seeded augmentation, one-line errors.

    Shape:
        yields ``(x (B, C, H, W), y (B,), skipped_paths)`` (see :func:`collate_skip`).
    """
    return _Loader(
        _PerSampleSeed(dataset, sampler),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        collate_fn=collate_skip,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers fork per epoch with the sampler's current epoch
    )
