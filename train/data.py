"""Data for the training app: ``LightningDataModule``s over small tabular sets, no downloads.

Every module yields ``(x, y)`` batches: ``x`` float32 ``(B, D)``; ``y`` int64 class indices ``(B,)``
for classification, float32 ``(B, K)`` targets for regression. The split is made once, from
``seed``: train / val / test (stratified by class for classification); features are standardised
with the training split's mean and standard deviation (the val and test splits never leak into
them).

``Digits`` (scikit-learn's bundled 8×8 digits, the default), ``Moons`` (two interleaved half
circles), ``SeedRegression`` (the seed's synthetic regression) and ``FileData`` (your own ``.csv``
or ``.npz``). A bad file stops with a ``DataError`` naming the file and the problem, raised when
the module is built, before any training starts.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from handgrad.dp import PoissonSampler

from .errors import DataError

__all__ = ["DataError", "TabularData", "Digits", "Moons", "SeedRegression", "FileData"]

Task = Literal["classification", "regression"]


class EpochBatches(Sampler[torch.Tensor]):
    """Batches of indices from a permutation that depends only on ``(seed, epoch)``; this
    process's share of each batch.

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from a checkpoint draws the
    same batches as one that was never interrupted (a ``RandomSampler``
    draws from the global RNG, whose state a checkpoint does not hold). The loader indexes the
    tensors once per batch, not once per sample.

    Under DDP (W processes, rank r) each batch of ``batch_size`` samples is cut into W near-equal
    slices and process r takes slice r, so the processes of one step together see exactly the
    batch one process would, and DDP's average of their gradients is (up to the last, uneven
    batch) the single-process gradient. ``seed=None``: in order, for evaluation, each process
    taking one contiguous shard.
    """

    def __init__(self, n: int, batch_size: int, seed: Optional[int], rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[torch.Tensor]:
        if self.seed is None:  # evaluation: this process's contiguous shard, in order
            shard = torch.tensor_split(torch.arange(self.n), self.world)[self.rank]
            return list(torch.split(shard, self.batch_size)) if len(shard) else []
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        batches = list(torch.split(order, self.batch_size))
        if len(batches[-1]) < self.world:  # too few to give every process one: dropped for all, so
            batches.pop()  # every process makes the same number of steps (DDP would hang otherwise)
        return [torch.tensor_split(b, self.world)[self.rank] for b in batches]

    def __iter__(self):
        # a generator: the permutation is drawn at the first batch, after Lightning's set_epoch
        # (a resumed run creates the iterator before it sets the epoch)
        yield from self._batches()

    def __len__(self) -> int:
        def part(m: int) -> int:  # this process's share of m indices under tensor_split
            return m // self.world + (1 if self.rank < m % self.world else 0)

        if self.seed is None:
            return math.ceil(part(self.n) / self.batch_size)
        full, last = divmod(self.n, self.batch_size)
        return full + (1 if last >= self.world else 0)


class TabularData(pl.LightningDataModule):
    """Base: subclasses implement ``load()`` returning ``(X (N, D) float, y (N,) or (N, K))``.

    Args:
        batch_size: samples per optimizer step, over all processes together (under DDP each of
            the W processes takes ``batch_size / W``); ``None`` = the whole training split
            (full-batch gradient descent); 1 = stochastic gradient descent.
        val_fraction: share of the samples held out for validation.
        test_fraction: share of the samples held out for the final test.
        standardize: ``feature``: subtract the training split's mean and divide by its std, per
            feature; ``global``: one mean and std over all features (keeps the relative scale of
            pixels, what image data wants); ``none``: leave the features as they are.
        seed: seeds the split and the per-epoch shuffling.
        num_workers: DataLoader worker processes (0 = load in the training process).
        poisson: training batches by Poisson sampling (``handgrad.dp.PoissonSampler``): each
            takes every training sample with probability q = batch_size / n, so its size varies
            around batch_size; what DP-SGD's privacy accounting assumes (configs/digits_dp.yaml).
    """

    task: Task = "classification"

    def __init__(
        self,
        batch_size: Optional[int] = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        standardize: Literal["feature", "global", "none"] = "feature",
        seed: int = 0,
        num_workers: int = 0,
        poisson: bool = False,
    ):
        super().__init__()
        # every __init__ argument (of the subclass too) goes into the checkpoint, so resuming can
        # tell whether the config names the same data; not logged (hparams.yaml is the model's)
        self.save_hyperparameters(logger=False)
        if batch_size is not None and batch_size < 1:
            raise DataError(f"batch_size must be a positive integer or null (full batch), got {batch_size}")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise DataError(f"{name} must be in [0, 1), got {frac}")
        if standardize not in ("feature", "global", "none"):
            raise DataError(f"standardize must be 'feature', 'global' or 'none', got {standardize!r}")
        if val_fraction + test_fraction >= 1.0:
            raise DataError(f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}")
        self.batch_size = batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.standardize, self.seed, self.num_workers = standardize, seed, num_workers
        self.poisson = poisson
        self._splits: dict[str, TensorDataset] | None = None
        self.class_names: list[str] | None = None

    # --- what subclasses provide -------------------------------------------------------------
    def load(self) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def augment(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Extra training samples made from the training split (val and test are never augmented)."""
        return x, y

    # --- sizes the model is built from (read by the CLI's argument links) ---------------------
    @property
    def num_features(self) -> int:
        return self.splits["train"].tensors[0].shape[1]

    @property
    def image_shape(self) -> Optional[list[int]]:
        """[C, H, W] when each sample's D features are an image's pixels, C·H·W = D; ``None``: tabular."""
        return None

    @property
    def num_outputs(self) -> int:
        """Classes for classification, target dimensions for regression."""
        if self.task == "classification":
            return len(self.class_names)
        return self.splits["train"].tensors[1].shape[1]

    # --- the split, made once ----------------------------------------------------------------
    @property
    def splits(self) -> dict[str, TensorDataset]:
        if self._splits is None:
            self._splits = self._make_splits()
        return self._splits

    def _make_splits(self) -> dict[str, TensorDataset]:
        from sklearn.model_selection import train_test_split

        x, y = self.load()
        x = np.asarray(x, dtype=np.float64)
        if self.task == "classification":
            labels, y = np.unique(np.asarray(y), return_inverse=True)
            if self.class_names is None:
                self.class_names = [str(v) for v in labels]
            y = y.astype(np.int64)
        else:
            y = np.asarray(y, dtype=np.float64)
            y = y[:, None] if y.ndim == 1 else y
        n = len(x)
        idx = np.arange(n)
        stratify = y if self.task == "classification" else None
        rest, test = self._split(train_test_split, idx, self.test_fraction, stratify)
        val_share = self.val_fraction / (1.0 - self.test_fraction)
        train, val = self._split(train_test_split, rest, val_share, None if stratify is None else y[rest])
        if len(train) == 0:
            raise DataError(f"{self.describe()}: no training samples left after the val/test split ({n} samples)")
        parts = {"train": self.augment(x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
        x_train = parts["train"][0]
        if self.standardize == "feature":
            mean, std = x_train.mean(0), x_train.std(0)
        elif self.standardize == "global":
            mean, std = np.full(x.shape[1], x_train.mean()), np.full(x.shape[1], x_train.std())
        else:
            mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
        std = np.where(std > 0, std, 1.0)  # constant features (digits' blank corner pixels) stay 0
        self.mean, self.std = mean, std
        y_dtype = torch.int64 if self.task == "classification" else torch.float32

        def ds(xs, ys):
            return TensorDataset(torch.as_tensor((xs - mean) / std, dtype=torch.float32), torch.as_tensor(ys, dtype=y_dtype))

        return {k: ds(*v) for k, v in parts.items()}

    def _split(self, train_test_split, idx, fraction, stratify):
        if fraction <= 0:
            return idx, idx[:0]
        try:
            return train_test_split(idx, test_size=fraction, random_state=self.seed, stratify=stratify)
        except ValueError as e:  # e.g. a class with a single sample cannot be stratified
            raise DataError(f"{self.describe()}: cannot split {len(idx)} samples (fraction {fraction}): {e}") from e

    def describe(self) -> str:
        return type(self).__name__

    # --- loaders -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.splits  # noqa: B018 - make the split (and raise on bad data) before any loop starts

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.splits[split]
        n = len(data)
        rank, world = self._rank_world()
        if shuffle:  # batch_size is the batch of one update over all processes; null: all of the split
            batch = n if self.batch_size is None else self.batch_size
            if batch < world:
                raise DataError(f"batch_size {batch} is the batch over all {world} processes and must be at least {world}")
            if self.poisson and world > 1:
                raise DataError("poisson: true samples the batches in one process; it does not shard over DDP")
            sampler = (PoissonSampler(n, batch / n, seed=self.seed) if self.poisson  # index lists; the dataset takes them
                       else EpochBatches(n, batch, self.seed, rank, world))
        else:  # evaluation: each process its own shard, nothing padded or repeated
            sampler = EpochBatches(n, 4096, None, rank=rank, world=world)
        # batch_size=None: the sampler yields whole batches and TensorDataset indexes with them;
        # the trainer must not add its own DistributedSampler (the CLI sets use_distributed_sampler: false)
        return DataLoader(data, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class Digits(TabularData):
    """scikit-learn's bundled handwritten digits: 1797 images of 8×8 pixels (64 features), 10 classes.

    Shipped inside scikit-learn, so nothing is downloaded. Default split: 1257 train, 180 val,
    360 test, stratified.

    Args:
        shift_augment: add to the training split four copies of every training image shifted by
            one pixel (up, down, left, right; the uncovered row/column is blank), 5× the samples.
            Val and test stay untouched. Use it with ``standardize: global``: a per-pixel std
            would blow up the near-blank border pixels the shifted copies write into.
    """

    def __init__(self, shift_augment: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.shift_augment = shift_augment

    @property
    def image_shape(self) -> list[int]:
        return [1, 8, 8]  # the 64 features are the 8×8 pixels, row by row (what network: cnn reads)

    def augment(self, x, y):
        if not self.shift_augment:
            return x, y
        img = x.reshape(-1, 8, 8)  # (N, H, W)
        copies = [img]
        for axis in (1, 2):
            for step in (1, -1):
                shifted = np.roll(img, step, axis=axis)
                edge = 0 if step == 1 else -1  # the row/column that wrapped around is blanked
                if axis == 1:
                    shifted[:, edge, :] = 0.0
                else:
                    shifted[:, :, edge] = 0.0
                copies.append(shifted)
        return np.concatenate(copies).reshape(-1, 64), np.tile(y, len(copies))

    def load(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.class_names = [str(c) for c in d.target_names]
        return d.data, d.target


class Moons(TabularData):
    """Two interleaved half circles in 2-D (scikit-learn's ``make_moons``), 2 classes.

    Args:
        n_samples: points in total (both classes).
        noise: standard deviation of the Gaussian noise added to each point.
    """

    def __init__(self, n_samples: int = 1000, noise: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.n_samples, self.noise = n_samples, noise

    def load(self):
        from sklearn.datasets import make_moons

        return make_moons(n_samples=self.n_samples, noise=self.noise, random_state=self.seed)


class SeedRegression(TabularData):
    """The seed's synthetic regression: targets in (0, 1) that a sigmoid output layer can reach.

    x ~ U(−1, 1)^D; target k is ``y_k = 0.5 + 0.4 sin(π x·a_k) + ε`` with fixed random unit
    directions ``a_k`` and ε ~ N(0, noise²), clipped to [0.01, 0.99]. Trained with ½‖x_L − y‖².

    Args:
        n_samples: samples in total.
        in_features: D, the input dimension.
        out_features: K, the target dimension.
        noise: standard deviation of ε.
    """

    task: Task = "regression"

    def __init__(self, n_samples: int = 512, in_features: int = 2, out_features: int = 1, noise: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.n_samples, self.in_features, self.out_features, self.noise = n_samples, in_features, out_features, noise

    def load(self):
        rng = np.random.default_rng(self.seed)
        x = rng.uniform(-1.0, 1.0, size=(self.n_samples, self.in_features))
        a = rng.normal(size=(self.in_features, self.out_features))
        a /= np.linalg.norm(a, axis=0, keepdims=True)
        y = 0.5 + 0.4 * np.sin(np.pi * x @ a) + self.noise * rng.normal(size=(self.n_samples, self.out_features))
        return x, np.clip(y, 0.01, 0.99)


class FileData(TabularData):
    """Your own data: a ``.csv`` with a header row, or a ``.npz`` of named arrays.

    Args:
        path: the ``.csv`` or ``.npz`` file.
        label: the label column (csv) or array (npz). Class labels may be any values (numbers or
            strings); they are mapped to 0..C−1 in sorted order.
        features: the feature columns (csv) or arrays (npz, each 1-D or 2-D, stacked as
            columns); ``null`` = every column/array except the label.
        task: ``classification`` (labels are classes) or ``regression`` (numeric targets).
    """

    def __init__(
        self,
        path: str,
        label: str = "label",
        features: Optional[list[str]] = None,
        task: Task = "classification",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.path, self.label, self.features, self.task = Path(path), label, features, task
        self.splits  # noqa: B018 - read and check the file now: bad data stops before training

    def describe(self) -> str:
        return f"data file '{self.path}'"

    def _fail(self, problem: str):
        raise DataError(f"{self.describe()}: {problem}")

    def load(self):
        if not self.path.exists():
            self._fail("no such file")
        if self.path.is_dir():
            self._fail("is a directory, expected a .csv or .npz file")
        suffix = self.path.suffix.lower()
        if suffix == ".csv":
            x, y, names = self._read_csv()
        elif suffix == ".npz":
            x, y, names = self._read_npz()
        else:
            self._fail(f"unsupported file type '{suffix}', expected .csv or .npz")
        if len(x) == 0:
            self._fail("contains no samples")
        if x.shape[1] == 0:
            self._fail("has no feature columns")
        nan_rows, nan_cols = np.nonzero(~np.isfinite(x))
        if len(nan_rows):
            self._fail(
                f"feature '{names[nan_cols[0]]}' has a NaN or infinite value in row {nan_rows[0] + 1} "
                f"({len(nan_rows)} such values in total); remove or impute them first"
            )
        if self.task == "regression":
            try:
                y = np.asarray(y, dtype=np.float64)
            except ValueError:
                self._fail(f"label '{self.label}' is not numeric, but task is regression")
            if not np.isfinite(y).all():
                bad = np.nonzero(~np.isfinite(y.reshape(len(y), -1)))[0]
                self._fail(f"label '{self.label}' has a NaN or infinite value in row {bad[0] + 1}")
        else:
            y = np.asarray(y)
            if y.ndim != 1:
                self._fail(f"label '{self.label}' must be 1-D for classification, got shape {y.shape}")
            missing = np.array([v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) or v == "" for v in y.tolist()])
            if missing.any():
                self._fail(f"label '{self.label}' is missing (empty or NaN) in row {np.nonzero(missing)[0][0] + 1}")
            if len(np.unique(y)) < 2:
                self._fail(f"label '{self.label}' has a single class ({y[0]!r}); classification needs at least 2")
        return x, y

    def _read_csv(self):
        try:
            with open(self.path, newline="") as f:
                rows = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            self._fail(f"is not a readable CSV file ({e})")
        rows = [r for r in rows if any(cell.strip() for cell in r)]
        if not rows:
            self._fail("is empty (expected a header row naming the columns)")
        header = [h.strip() for h in rows[0]]
        body = rows[1:]
        if self.label not in header:
            self._fail(f"has no label column '{self.label}'; its columns are: {', '.join(header)}")
        features = self.features if self.features is not None else [h for h in header if h != self.label]
        missing = [c for c in features if c not in header]
        if missing:
            self._fail(f"has no feature column(s) {', '.join(map(repr, missing))}; its columns are: {', '.join(header)}")
        for i, r in enumerate(body):
            if len(r) != len(header):
                self._fail(f"row {i + 1} has {len(r)} values but the header has {len(header)} columns")
        cols = [header.index(c) for c in features]
        x = np.empty((len(body), len(cols)))
        for i, r in enumerate(body):
            for j, c in enumerate(cols):
                cell = r[c].strip()
                try:
                    x[i, j] = float(cell) if cell else np.nan
                except ValueError:
                    self._fail(f"feature '{features[j]}' has a non-numeric value {cell!r} in row {i + 1}")
        y = np.array([r[header.index(self.label)].strip() for r in body], dtype=object)
        if self.task == "regression":
            y = np.array([float(v) if v else np.nan for v in self._numeric(y)])
        else:
            y = self._as_numbers_if_possible(y)
        return x, y, features

    def _numeric(self, y):
        for i, v in enumerate(y):
            try:
                float(v) if v else None
            except ValueError:
                self._fail(f"label '{self.label}' has a non-numeric value {v!r} in row {i + 1}, but task is regression")
        return y

    @staticmethod
    def _as_numbers_if_possible(y):
        if any(v == "" for v in y):
            return y  # the missing label is reported by load()
        for cast in (int, float):  # "3" → 3, "0.5" → 0.5, "setosa" stays a string
            try:
                return np.array([cast(v) for v in y])
            except ValueError:
                pass
        return y.astype(str)

    def _read_npz(self):
        try:
            arrays = np.load(self.path, allow_pickle=False)
            keys = list(arrays.keys())
        except Exception as e:  # numpy raises several types for a corrupt archive
            self._fail(f"is not a readable .npz archive ({type(e).__name__}: {e})")
        if self.label not in keys:
            self._fail(f"has no label array '{self.label}'; its arrays are: {', '.join(keys)}")
        features = self.features if self.features is not None else [k for k in keys if k != self.label]
        missing = [k for k in features if k not in keys]
        if missing:
            self._fail(f"has no feature array(s) {', '.join(map(repr, missing))}; its arrays are: {', '.join(keys)}")
        y = arrays[self.label]
        n = len(y)
        columns, names = [], []
        for k in features:
            a = arrays[k]
            if a.ndim not in (1, 2):
                self._fail(f"feature array '{k}' must be 1-D or 2-D, got shape {a.shape}")
            if len(a) != n:
                self._fail(f"feature array '{k}' has {len(a)} rows but label array '{self.label}' has {n}")
            if not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
                self._fail(f"feature array '{k}' is not numeric (dtype {a.dtype})")
            a = a.reshape(n, -1).astype(np.float64)
            columns.append(a)
            names += [k] if a.shape[1] == 1 else [f"{k}[{j}]" for j in range(a.shape[1])]
        x = np.concatenate(columns, axis=1) if columns else np.empty((n, 0))
        if y.dtype.kind in "fc" and self.task == "classification" and np.isnan(y).any():
            self._fail(f"label '{self.label}' is missing (NaN) in row {np.nonzero(np.isnan(y))[0][0] + 1}")
        return x, y, names
