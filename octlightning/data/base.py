"""What every octlightning DataModule shares: loader settings, evaluation samplers, padding collate."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from octlightning.data.training_loader import ContinuousTrainLoader
from octlightning.errors import ConfigError, DataError


def default_num_workers() -> int:
    """One worker per CPU core left after the training process, per local GPU process, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_procs = max(1, torch.cuda.device_count())
    return max(0, min(8, cpus // local_procs - 1))


def image_size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` in pixels from an int (square) or a ``[height, width]`` pair.

    Raises:
        ConfigError: not one int or two, or a side below 1 (naming ``--data.init_args.image_size``).
    """
    size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"--data.init_args.image_size must be an int or [height, width] >= 1, got {image_size}")
    return int(size[0]), int(size[1])


def require_fold(num_folds: int, fold: int) -> None:
    """Raise :class:`ConfigError` unless ``num_folds`` is 0 (no cross-validation) or >= 2 with ``fold`` in
    ``[0, num_folds)``."""
    if num_folds and (num_folds < 2 or not 0 <= fold < num_folds):
        raise ConfigError(
            f"--data.init_args.num_folds must be 0 (none) or >= 2, and --data.init_args.fold in [0, num_folds); "
            f"got num_folds {num_folds}, fold {fold}"
        )


def split_indices(
    groups: Sequence[Any], fractions: Sequence[float], seed: int, num_folds: int = 0, fold: int = 0
) -> list[np.ndarray]:
    """Split items into parts by *group* (subject, volume, patient), reproducibly from ``seed``.

    ``fractions`` gives the share of groups for every part but the first, which takes the rest (below 1 a
    fraction, else a count of groups); each part with a non-zero fraction gets at least one group when
    there are enough groups. Returns the item indices of each part, sorted.

    With ``num_folds`` >= 2 (group-wise k-fold cross-validation), the last part is fold ``fold``
    (0-based) of ``num_folds`` near-equal parts of the seeded order of the groups, whatever its fraction,
    so that the folds' last parts together hold every group exactly once; the other parts are drawn,
    as above, from the groups outside that fold.

    Raises:
        DataError: the parts would leave no group for the first part (training), or there are fewer
            groups than folds.
        ConfigError: ``fold`` is not in ``[0, num_folds)``, or ``num_folds`` is 1 or negative.
    """
    groups = np.asarray(groups)
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    order = rng.permutation(unique)
    last: np.ndarray | None = None
    if num_folds:
        require_fold(num_folds, fold)
        if len(unique) < num_folds:
            raise DataError(
                f"num_folds {num_folds} is more than the {len(unique)} groups (subjects, cases or images) to split; "
                f"use at most {len(unique)} folds"
            )
        last = np.array_split(order, num_folds)[fold]
        order, fractions = order[~np.isin(order, last)], fractions[:-1]
    counts = [int(round(f * len(order))) if f < 1 else int(f) for f in fractions]
    counts = [max(1, c) if f > 0 and len(order) > len(fractions) else c for c, f in zip(counts, fractions, strict=True)]
    if sum(counts) >= len(order):
        kept = f" outside fold {fold} of {num_folds}" if num_folds else ""
        raise DataError(
            f"cannot split {len(order)} groups{kept} into parts of {counts} groups and keep any for training"
        )
    parts, start = [], len(order) - sum(counts)
    parts.append(order[:start])
    for c in counts:
        parts.append(order[start : start + c])
        start += c
    if last is not None:
        parts.append(last)
    return [np.sort(np.flatnonzero(np.isin(groups, p))) for p in parts]


T = TypeVar("T")


def _arrays(value: Any) -> Iterator[np.ndarray]:
    """The numpy arrays in a (nested) tuple/list/dict sample."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v)


class SampleCache:
    """Decoded samples kept in the memory of each loader process, up to ``max_mb`` megabytes.

    Decoding (JPEG/PNG, gzip-compressed HDF5) and resizing cost more CPU than the augmentation that
    follows. Loader workers persist across epochs, so a dataset that fits the budget (the 40 PH2 cases,
    one Duke HDF5 file) is decoded once per worker and served from memory afterwards; a larger one fills
    the budget and reads the rest from disk every time. Each process (the main one and every worker)
    holds its own copy: the memory used is at most ``max_mb`` times the number of loader processes.

    Cached arrays are made read-only, so a transform that modified one in place would fail loudly
    instead of silently changing the sample for every later epoch.
    """

    def __init__(self, max_mb: float = 1024) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self._items: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The cached value for ``key``, or ``load()``'s, kept when it fits the budget."""
        if key in self._items:
            return self._items[key]
        value = load()
        arrays = list(_arrays(value))
        size = sum(a.nbytes for a in arrays)
        if self.bytes + size <= self.max_bytes:
            for a in arrays:
                a.flags.writeable = False
            self._items[key] = value
            self.bytes += size
        return value


def cached(cache: SampleCache | None, key: Hashable, load: Callable[[], T]) -> T:
    """``load()``, kept in and served from ``cache`` when there is one (see :class:`SampleCache`)."""
    return load() if cache is None else cache.get(key, load)


def pad_to_multiple(tensor: torch.Tensor, height: int, width: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two dimensions at the bottom/right to ``height`` x ``width``."""
    h, w = tensor.shape[-2:]
    return F.pad(tensor, (0, width - w, 0, height - h), value=value)


def make_pad_collate(multiple: int, spatial_keys: Sequence[str], pad_values: dict[str, float] | None = None):
    """Collate samples of different sizes by padding the spatial tensors to a common size.

    The common size is the largest height/width in the batch rounded up to ``multiple`` (the network's
    stride). Padded pixels get value 0 (so a validity/field-of-view mask excludes them from losses and
    metrics); each sample keeps its original ``size`` for cropping predictions back.
    """
    pad_values = pad_values or {}

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        key0 = spatial_keys[0]
        h = max(s[key0].shape[-2] for s in samples)
        w = max(s[key0].shape[-1] for s in samples)
        h, w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        padded = []
        for s in samples:
            s = dict(s)
            for k in spatial_keys:
                if k in s:
                    s[k] = pad_to_multiple(s[k], h, w, pad_values.get(k, 0.0))
            padded.append(s)
        return default_collate(padded)

    return collate


class BaseDataModule(L.LightningDataModule):
    """The contract every octlightning DataModule meets: one name for each shared setting, and what the
    model must agree with.

    Every DataModule takes the shared arguments under these names (``--data.help CLASS`` shows these
    descriptions for a subclass that does not document one itself).

    Args:
        root: the dataset folder or file.
        batch_size: training batch size.
        eval_batch_size: batch size for validation/test/predict (``None``: ``batch_size``).
        num_workers: loader worker processes; ``None`` picks one per free CPU core (at most 8).
        seed: seed for splits and patch sampling.
        val_fraction: share of the training groups (subjects, volumes, images) held out for validation
            where the dataset has no validation split of its own.
        test_fraction: share held out for ``test`` where the dataset has no test split (0: none).
        predict_dir: a folder (or file) to predict; ``None`` predicts the test split.
        in_channels: channels of the network input the samples carry.
        cache_mb: memory per loader process for decoded samples (:attr:`cache`, a :class:`SampleCache`;
            0: none).
        test_dir: another dataset (folder or file, in a layout this DataModule reads) that ``test``
            scores whole: every annotated sample of it, whatever ``root``'s splits; ``None`` tests the
            test split of ``root``. For evaluating on a held-out dataset (train on DRIVE, test on
            CHASE_DB1; train on one HDF5 file, test on another).
        num_folds: group-wise k-fold cross-validation where the test split is drawn from ``root`` (0:
            none): the test split is fold ``fold`` of ``num_folds`` seeded folds of the groups, in place
            of ``test_fraction``; validation is drawn from the other folds by ``val_fraction``. Running
            every ``fold`` with one ``seed`` tests each group exactly once (``experiments/oct_unet_cv.json``
            sweeps them; the sweep's ``cross_validation.csv`` averages the folds).
        fold: the fold (0-based, below ``num_folds``) that is the test split.

    What the model must agree with, read by the CLI and linked into the model's arguments (typed once,
    in the data): :attr:`in_channels`; for segmentation :attr:`num_classes` (network output channels:
    1 for binary, else the classes including background) and :attr:`class_names` (foreground classes);
    for boundary regression :attr:`num_boundaries`, :attr:`boundary_names` and :attr:`output_width`;
    :attr:`patch_size` (the training tile, the default sliding window for evaluation). Attributes a
    DataModule does not determine stay ``None``.

    What the layout allows, declared by each subclass and checked here when it is built:
    :attr:`channel_choices` (the ``in_channels`` its samples can carry) and :attr:`own_splits` (the
    splits it brings itself, whose ``<split>_fraction`` must then stay 0).

    Samples are dicts with the keys of :class:`octlightning.data.sample.Sample`. A subclass's ``setup``
    calls :meth:`require_sources` first, then creates ``train_set``/``val_set`` (fit), ``test_set`` (test)
    and ``predict_set`` (predict); the loaders here serve them with the shared settings.
    """

    num_classes: int | None = None
    class_names: list[str] | None = None
    num_boundaries: int | None = None
    boundary_names: list[str] | None = None
    output_width: int | None = None
    patch_size: list[int] | None = None
    #: ``in_channels`` value -> what the samples then carry (named in the error for any other value)
    channel_choices: dict[int, str] = {1: "grey", 3: "grey repeated, for RGB-pretrained encoders"}
    #: split -> where the layout has it from; its ``<split>_fraction`` must stay 0
    own_splits: dict[str, str] = {}

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 42,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        predict_dir: str | None = None,
        in_channels: int = 3,
        cache_mb: float = 1024,
        test_dir: str | None = None,
        *,
        num_folds: int = 0,
        fold: int = 0,
    ) -> None:
        super().__init__()
        if val_fraction < 0 or test_fraction < 0:
            raise ConfigError(f"val_fraction and test_fraction must be >= 0, got {val_fraction}, {test_fraction}")
        name = type(self).__name__
        for split, fraction in (("val", val_fraction), ("test", test_fraction)):
            if fraction >= 1 and fraction != int(fraction):  # 1.5 was read as a count of 1 without a word
                raise ConfigError(
                    f"--data.init_args.{split}_fraction {fraction}: below 1 a fraction, else a whole count of "
                    f"subjects, cases or images; {fraction} is neither"
                )
            if fraction and split in self.own_splits:
                raise ConfigError(f"{name}: {split}_fraction must be 0: the {split} split is {self.own_splits[split]}")
        if num_folds:
            require_fold(num_folds, fold)
            if "test" in self.own_splits:
                raise ConfigError(
                    f"{name}: num_folds must be 0: the test split is {self.own_splits['test']}, so there is no "
                    f"test split to cross-validate"
                )
        if in_channels not in self.channel_choices:
            choices = " or ".join(f"{k} ({what})" for k, what in self.channel_choices.items())
            raise ConfigError(f"{name}: in_channels must be {choices}, got {in_channels}")
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.predict_dir = predict_dir
        self.in_channels = in_channels
        self.cache_mb = cache_mb
        self.test_dir = test_dir
        self.num_folds, self.fold = num_folds, fold
        self.cache = SampleCache(cache_mb)  # for the subclass's training and validation datasets
        self._train_loader: ContinuousTrainLoader | None = None

    def require_sources(self, stage: str | None) -> None:
        """Raise :class:`DataError` naming the path and the option that sets it when a dataset ``stage``
        reads does not exist: ``root``, or for ``test``/``predict`` the ``test_dir``/``predict_dir`` when
        given; ``None``: every one given (for a ``prepare_data`` that reads them all).

        Each subclass's ``setup`` calls it first, so that a wrong path is reported as such and not as the
        first file its layout would look for inside it.
        """
        given = {"root": self.root, "test_dir": self.test_dir, "predict_dir": self.predict_dir}
        if stage is not None:
            option = {"test": "test_dir", "predict": "predict_dir"}.get(stage, "root")
            given = {option: given[option]} if given[option] is not None else {"root": self.root}
        for option, path in given.items():
            if path is not None and not Path(path).exists():
                # A relative path is read from the working directory: show where that led.
                where = path if Path(path).is_absolute() else f"{path} (= {Path(path).resolve()})"
                raise DataError(
                    f"{where}: not found (no such file or folder); set --data.init_args.{option} to the dataset "
                    f"{type(self).__name__} reads"
                )

    @property
    def fold_note(self) -> str:
        """``", test = fold 1 of 4"`` when cross-validating, else ``""``: for a split's log line."""
        return f", test = fold {self.fold} of {self.num_folds}" if self.num_folds else ""

    def warn_unused_test_split(self, held_out: str) -> None:
        """Warn, when ``test_dir`` is set, that the test split ``test_fraction`` (or the fold) drew from ``root``
        (``held_out`` names it, e.g. ``"subjects [1] (11 B-scans)"``) is neither trained on nor tested.

        Subclasses call it where their split draws a test part (by fraction or fold)."""
        if self.test_dir is not None:
            rule, option = f"test_fraction {self.test_fraction}", "--data.init_args.test_fraction 0"
            if self.num_folds:
                rule, option = f"fold {self.fold} of num_folds {self.num_folds}", "--data.init_args.num_folds 0"
            warnings.warn(
                f"{type(self).__name__}: test scores test_dir {self.test_dir}, so the test split that {rule} held "
                f"out of root ({held_out}) is neither trained on nor tested; set {option} to train on it",
                stacklevel=2,
            )

    # Subclasses override to pad variable-size samples; default stacks equal-size samples.
    def collate_fn(self, train: bool):
        return None

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader | ContinuousTrainLoader:
        workers = self.num_workers
        settings: dict[str, Any] = {
            "num_workers": workers,
            "pin_memory": torch.cuda.is_available(),
            "collate_fn": self.collate_fn(train),
        }
        if train:
            # One iterator across epochs: the workers prepare the next epoch while this one ends.
            trainer = self.trainer
            self.close_train_loader()
            self._train_loader = ContinuousTrainLoader(
                dataset,
                self.batch_size,
                drop_last=len(dataset) > self.batch_size,
                seed=self.seed,
                current_epoch=(lambda: trainer.current_epoch) if trainer is not None else None,
                rank=trainer.global_rank if trainer is not None else 0,
                generator=torch.Generator().manual_seed(self.seed),  # the workers' base seed
                **settings,
            )
            return self._train_loader
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning's default DistributedSampler pads the last batch with repeated samples, which
            # would count them twice in validation/test metrics: give each sample to one rank only.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            persistent_workers=workers > 0,
            **settings,
        )

    def close_train_loader(self) -> None:
        """Stop the training loader's workers (at the end of fit; they outlive single epochs)."""
        if self._train_loader is not None:
            self._train_loader.close()
        self._train_loader = None

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.close_train_loader()

    def train_dataloader(self):
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return self._loader(self.val_set, train=False)

    def test_dataloader(self):
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self):
        # What predict reads is said nowhere else (test says it of a test_dir, fit of its splits).
        source = self.predict_dir if self.predict_dir is not None else f"{self.root} (predict_dir not set)"
        rank_zero_info(f"{type(self).__name__}: predicting {len(self.predict_set)} samples of {source}")
        return self._loader(self.predict_set, train=False)
