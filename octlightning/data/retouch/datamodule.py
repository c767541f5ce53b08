"""The RETOUCH DataModule: cases -> cached preprocessing -> case-wise, vendor-stratified splits -> loaders."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from octlightning.data.base import BaseDataModule, make_pad_collate, split_indices
from octlightning.data.retouch.cases import FLUIDS, VENDORS, RetouchCase, canonical_vendor, find_cases
from octlightning.data.retouch.datasets import RetouchPatchDataset, RetouchSliceDataset
from octlightning.data.retouch.preprocess import PreprocessSettings, VolumeStore, build_cache, default_cache_dir
from octlightning.data.transforms import segmentation_augmentation
from octlightning.errors import ConfigError, DataError


class RetouchDataModule(BaseDataModule):
    """RETOUCH fluid segmentation (IRF = 1, SRF = 2, PED = 3) from the challenge's MetaImage layout.

    ``root`` is read as the challenge distributes it (``RETOUCH-TrainingSet-<Vendor>/TRAINnnn/oct.mhd``
    + ``reference.mhd``, test sets beside them, see :mod:`octlightning.data.retouch.cases`). Splits are
    by case, stratified by vendor and seeded: ``val_fraction`` and ``test_fraction`` of each vendor's
    labelled cases. Training draws patches, evaluation and prediction use whole B-scans
    (:mod:`octlightning.data.retouch.datasets`). What the model must agree with: :attr:`num_classes`
    (4, background included), :attr:`class_names` (``IRF``, ``SRF``, ``PED``), :attr:`in_channels`.

    Args:
        root: folder holding the case folders at any depth (e.g. the extracted challenge archives).
        batch_size: training batch size (patches).
        eval_batch_size: validation/test/predict batch size; evaluation batches are whole B-scans, keep
            it small.
        num_workers, seed: see :class:`~octlightning.data.base.BaseDataModule`.
        val_fraction: share of each vendor's labelled cases for validation.
        test_fraction: share of each vendor's labelled cases for test.
        predict_dir: another folder of cases to predict (matched to this dataset's reference histogram).
            Without it, ``predict`` takes the cases without ``reference.mhd``, or the test cases when every
            case is labelled.
        test_dir: another folder of cases whose every labelled case ``test`` scores (preprocessed like
            ``predict_dir``); ``None`` tests ``root``'s test cases.
        num_folds: case-wise k-fold cross-validation, stratified by vendor (0: none): the test cases are
            fold ``fold`` of ``num_folds`` folds of each vendor's labelled cases, in place of
            ``test_fraction``; not with ``test_cases``.
        fold: the fold (0-based, below ``num_folds``) that is the test split.
        in_channels: network input channels: 1 (grey) or 3 (grey repeated, for RGB-pretrained encoders).
        cache_mb: memory per loader process for the candidate patch centres of each training B-scan
            (see :class:`~octlightning.data.base.SampleCache`; 0 finds them again for every patch).
        cache_dir: where preprocessed volumes go (default :func:`~.preprocess.default_cache_dir`, in
            ``$XDG_CACHE_HOME/octlightning/retouch/``, else ``~/.cache/octlightning/retouch/``); never
            the dataset's folder.
        vendor: the device (Cirrus, Spectralis, Topcon) of cases whose path names none, for a folder of
            one vendor; a path naming another vendor is an error (see
            :func:`~.cases.resolve_vendor`).
        histogram_reference: vendor whose pooled grey-level histogram the other vendors are matched to;
            ``None`` switches histogram matching off.
        intensity_percentiles: grey values mapped to 0 and 255 before matching.
        median_size: odd median filter size per B-scan (1 disables).
        roi_downsample: the retina ROI (:func:`~.preprocess.retina_roi`) is found on the B-scan shrunk
            by this factor.
        roi_smoothing: Gaussian sigma (shrunk pixels) before the ROI's entropy is computed.
        roi_levels: grey levels the shrunk B-scan is quantised to for the entropy.
        roi_background_percentile: grey-value percentile below which the B-scan is background.
        roi_entropy_radius: radius (shrunk pixels) of the local-entropy disk.
        roi_closing_radius: radius (shrunk pixels) of the closing that makes the ROI solid (0: none).
        patch_size: training patch ``[height, width]`` in pixels (rows, columns of a B-scan).
        positive_fraction: share of each epoch's patches that are centred on fluid.
        balance_fluids: draw positive patches evenly over the fluid classes present.
        patches_per_epoch: patches per training epoch (default: one per training B-scan).
        val_cases: explicit validation case names (override ``val_fraction``; never training).
        test_cases: explicit test case names (override ``test_fraction``; may overlap ``val_cases``,
            never training).
        augment: horizontal flips and brightness/contrast changes of training patches.
        pad_to: whole B-scans are padded to a multiple of this (the network's stride).

    Raises:
        DataError: (in ``prepare_data``/``setup``) for every unreadable or inconsistent case, naming it.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        eval_batch_size: int | None = 4,
        num_workers: int | None = None,
        seed: int = 42,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        predict_dir: str | None = None,
        in_channels: int = 1,
        cache_mb: float = 1024,
        test_dir: str | None = None,
        num_folds: int = 0,
        fold: int = 0,
        cache_dir: str | None = None,
        vendor: str | None = None,
        histogram_reference: str | None = "Spectralis",
        intensity_percentiles: tuple[float, float] = (0.5, 99.5),
        median_size: int = 3,
        roi_downsample: int = 4,
        roi_smoothing: float = 1.5,
        roi_levels: int = 16,
        roi_background_percentile: float = 50.0,
        roi_entropy_radius: int = 4,
        roi_closing_radius: int = 4,
        patch_size: tuple[int, int] = (256, 128),
        positive_fraction: float = 0.5,
        balance_fluids: bool = True,
        patches_per_epoch: int | None = None,
        val_cases: list[str] | None = None,
        test_cases: list[str] | None = None,
        augment: bool = True,
        pad_to: int = 16,
    ) -> None:
        super().__init__(
            root, batch_size, eval_batch_size, num_workers, seed, val_fraction, test_fraction, predict_dir,
            in_channels, cache_mb, test_dir, num_folds=num_folds, fold=fold,
        )  # fmt: skip
        self.save_hyperparameters()
        if num_folds and test_cases is not None:
            raise ConfigError(f"test_cases {test_cases} are the test split: num_folds must then be 0, got {num_folds}")
        if histogram_reference is not None and histogram_reference not in VENDORS:
            raise ValueError(f"histogram_reference must be one of {VENDORS} or null, got {histogram_reference!r}")
        self.settings = PreprocessSettings(
            histogram_reference=histogram_reference,
            intensity_percentiles=(float(intensity_percentiles[0]), float(intensity_percentiles[1])),
            median_size=median_size,
            roi_downsample=roi_downsample,
            roi_smoothing=roi_smoothing,
            roi_levels=roi_levels,
            roi_background_percentile=roi_background_percentile,
            roi_entropy_radius=roi_entropy_radius,
            roi_closing_radius=roi_closing_radius,
        )
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(Path(root))
        self.vendor = canonical_vendor(vendor, "vendor option") if vendor else None
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.positive_fraction = positive_fraction
        self.balance_fluids = balance_fluids
        self.patches_per_epoch = patches_per_epoch
        self.val_cases = val_cases
        self.test_cases = test_cases
        self.augment = augment
        self.pad_to = pad_to
        self._store: VolumeStore | None = None
        self._other_stores: dict[str, VolumeStore] = {}  # predict_dir and test_dir, preprocessed
        self._split_said = False

    # ----------------------------------------------------------------- what the model must agree with
    @property
    def num_classes(self) -> int:
        """Output classes of the network: background + IRF, SRF, PED."""
        return 1 + len(FLUIDS)

    @property
    def class_names(self) -> list[str]:
        """Foreground class names in label order (label k is ``class_names[k - 1]``)."""
        return list(FLUIDS)

    # ----------------------------------------------------------------- cache
    def cases(self, root: str | None = None) -> list[RetouchCase]:
        """The cases under ``root`` (default: this dataset's), see :func:`~.cases.find_cases`."""
        return find_cases(Path(root or self.root), self.vendor)

    def store(self) -> VolumeStore:
        """The preprocessed dataset (built on first use, reused while settings and files are unchanged)."""
        if self._store is None:
            self._store = VolumeStore(build_cache(self.cases(), self.settings, self.cache_dir))
        return self._store

    def predict_store(self, folder: str | None = None) -> VolumeStore:
        """The preprocessed cases of ``folder`` (default ``predict_dir``), matched to this dataset's
        reference histogram."""
        folder = folder or self.predict_dir
        if folder not in self._other_stores:
            reference = self.store().reference_hist if self.settings.histogram_reference else None
            cases = self.cases(folder)
            self._other_stores[folder] = VolumeStore(build_cache(cases, self.settings, self.cache_dir, reference))
        return self._other_stores[folder]

    def prepare_data(self) -> None:
        # Runs once per node before setup on every rank: the cache is built here, read in setup.
        self.require_sources(None)
        self.store()
        for folder in (self.predict_dir, self.test_dir):
            if folder:
                self.predict_store(folder)

    # ----------------------------------------------------------------- splits
    def split(self) -> dict[str, list[str]]:
        """``train``/``val``/``test`` case names: by case, stratified by vendor, seeded."""
        store = self.store()
        labelled = [c for c in store.cases.values() if c.labelled]
        names = {c.name for c in labelled}
        for key, chosen in (("val_cases", self.val_cases), ("test_cases", self.test_cases)):
            unknown = sorted(set(chosen or []) - names)
            if unknown:
                raise DataError(
                    f"{key} {unknown} are not labelled cases of {self.root} (labelled: {sorted(names)[:20]})"
                )
        fixed = set(self.val_cases or []) | set(self.test_cases or [])
        parts: dict[str, list[str]] = {
            "train": [],
            "val": list(self.val_cases or []),
            "test": list(self.test_cases or []),
        }
        drawn = [
            (p, f)
            for p, f, given in (
                ("val", self.val_fraction, self.val_cases),
                ("test", self.test_fraction, self.test_cases),
            )
            if given is None and (f > 0 or (p == "test" and self.num_folds))
        ]
        for vendor in VENDORS:
            pool = sorted(c.name for c in labelled if c.vendor == vendor and c.name not in fixed)
            if not pool:
                continue
            if not drawn:
                parts["train"] += pool
                continue
            try:
                idx = split_indices(pool, [f for _, f in drawn], self.seed, self.num_folds, self.fold)
            except DataError as err:
                raise DataError(f"{vendor} cases {pool}: {err}") from None
            parts["train"] += [pool[i] for i in idx[0]]
            for (part, _), sel in zip(drawn, idx[1:], strict=True):
                parts[part] += [pool[i] for i in sel]
        parts = {k: sorted(v) for k, v in parts.items()}
        if any(part == "test" for part, _ in drawn) and parts["test"]:
            self.warn_unused_test_split(f"cases {parts['test']}")
        # the held-out cases are what a result is reported on: name them, and their vendors (once)
        if not self._split_said:
            self._split_said = True
            vendor_of = {c.name: c.vendor for c in labelled}

            def vendors(names: list[str]) -> str:
                return ", ".join(f"{v} {n}" for v, n in Counter(vendor_of[c] for c in names).items())

            said = "; ".join(f"{k} {v} ({vendors(v)})" for k, v in parts.items())
            rank_zero_info(f"RetouchDataModule: {self.root}: cases by split (seed {self.seed}{self.fold_note}): {said}")
        return parts

    # ----------------------------------------------------------------- stages
    def setup(self, stage: str) -> None:
        self.require_sources(stage)
        store = self.store()
        parts = self.split()
        if stage in ("fit", "validate"):
            if not parts["val"]:
                if self.val_fraction <= 0:
                    raise DataError(f"{self.root}: no validation cases; set val_fraction > 0 or val_cases")
                # a fraction of each vendor's few cases left by the test split rounds to none
                left = Counter(store.cases[c].vendor for c in parts["train"])
                raise DataError(
                    f"{self.root}: no validation cases: val_fraction {self.val_fraction} of each vendor's labelled "
                    f"cases outside the test split{self.fold_note} ({', '.join(f'{v} {n}' for v, n in left.items())}) "
                    f"rounds to none; name val_cases, use fewer folds or test_fraction, or add cases"
                )
            self.val_set = RetouchSliceDataset(store, parts["val"], self.in_channels)
        if stage == "fit":
            if not parts["train"]:
                raise DataError(f"{self.root}: no labelled training cases left after the validation/test split")
            n_slices = sum(store.cases[c].shape[0] for c in parts["train"])
            transform = segmentation_augmentation(
                hflip=0.5 if self.augment else 0,
                brightness_contrast=0.5 if self.augment else 0,
                extra_masks=("fov",),
            )
            self.train_set = RetouchPatchDataset(
                store,
                parts["train"],
                self.patch_size,
                self.positive_fraction,
                self.patches_per_epoch or n_slices,
                transform,
                self.balance_fluids,
                self.cache,
                self.in_channels,
            )
        if stage == "test" and self.test_dir:
            tstore = self.predict_store(self.test_dir)
            labelled = sorted(c.name for c in tstore.cases.values() if c.labelled)
            if not labelled:
                raise DataError(f"{self.test_dir}: no case with reference.mhd to test on")
            self.test_set = RetouchSliceDataset(tstore, labelled, self.in_channels)
        elif stage == "test":
            if not parts["test"]:
                raise DataError(
                    f"{self.root}: no test cases; set test_fraction > 0 or test_cases "
                    f"(cases without reference.mhd cannot be scored: use predict)"
                )
            self.test_set = RetouchSliceDataset(store, parts["test"], self.in_channels)
        if stage == "predict":
            if self.predict_dir:
                pstore = self.predict_store()
                cases = sorted(pstore.cases)
            else:
                pstore = store
                cases = sorted(c.name for c in store.cases.values() if not c.labelled)
                which = "the cases without reference.mhd"
                if not cases:
                    cases, which = parts["test"], "the test cases (every case has a reference.mhd)"
            if not cases:
                raise DataError(
                    f"{self.root}: nothing to predict: no case without reference.mhd, no test cases; "
                    f"set predict_dir, test_cases or test_fraction"
                )
            where = f"every case of {self.predict_dir}" if self.predict_dir else f"{which} of {self.root}"
            rank_zero_info(f"RetouchDataModule: predicting {where}: {cases}")
            self.predict_set = RetouchSliceDataset(pstore, cases, self.in_channels)

    def collate_fn(self, train: bool):
        return None if train else make_pad_collate(self.pad_to, ("image", "mask"))
