"""The DataModule every benchmark family shares: transforms, loaders and the selection loader.

A subclass only says which images and labels make each split (:meth:`build_split`), how many
classes there are, and what the dataset is called. Everything else -- preprocessing from the
backbone's pretrained config, loaders, the distributed samplers, the two-view loader for the
selection pass -- lives here, once.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Literal, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from grft_lightning.data.samplers import DealtBatches, EpochShuffle, ResumableLoader
from grft_lightning.core.seeding import run_seed
from grft_lightning.data.transforms import (
    OneView,
    TwoViews,
    fgvc_eval_transform,
    fgvc_train_transform,
    resize_transform,
    resolve_data_config,
    supcon_view_transform,
)

Split = Literal["train", "val", "test"]


class TransformedDataset(Dataset):
    """Wrap a dataset of ``(PIL image, label)`` pairs with a transform applied to the image."""

    def __init__(self, source: Dataset, transform: Callable):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return self.transform(image), label


def _distributed_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ImageClassificationData(L.LightningDataModule, metaclass=abc.ABCMeta):
    """Base DataModule for image classification benchmarks.

    Args:
        batch_size: Training batch size per device.
        eval_batch_size: Batch size for validation and test (default: ``batch_size``).
        num_workers: DataLoader worker processes per device.
        pin_memory: Pin host memory for faster host-to-GPU copies.
        augmentation: ``resize`` (VTAB protocol: plain resize, no augmentation) or ``fgvc``
            (random resized crop + flip for training; resize 248/224 + center crop for eval).
        backbone: timm model name whose pretrained config gives mean/std/size. Linked from
            ``model.backbone`` by the CLI; set it only when using the DataModule on its own.
        image_size: Overrides the input size from the backbone's config. Linked from
            ``model.image_size`` by the CLI.
        selection_batch_size: Batch size of the selection pass (default: ``batch_size``).
    """

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        augmentation: Literal["resize", "fgvc"] = "resize",
        backbone: str | None = None,
        image_size: int | None = None,
        selection_batch_size: int | None = None,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.augmentation = augmentation
        self.backbone = backbone
        self.image_size = image_size
        self.selection_batch_size = selection_batch_size or batch_size
        self.skipped_images = 0  # images dropped because they could not be decoded (reported)
        self._splits: dict[str, Dataset] = {}
        self._size_checked: tuple[str, int | None] | None = None  # (backbone, image_size) checked
        self._train_loader: ResumableLoader | None = None
        self._train_resume: dict[str, int] | None = None  # loader state from a checkpoint, not yet applied

    # -- what a subclass provides ------------------------------------------------------------
    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Number of classes of the task."""

    @property
    def dataset_name(self) -> str:
        """Name written to ``results.json`` (``dataset``)."""
        return type(self).__name__.lower()

    @abc.abstractmethod
    def build_split(self, split: Split) -> Dataset:
        """Return a dataset of ``(PIL.Image in RGB, int label)`` for ``split``."""

    def describe(self) -> dict[str, Any]:
        """Extra facts recorded in ``results.json`` (e.g. which extraction a folder is)."""
        return {}

    # -- shared machinery --------------------------------------------------------------------
    @property
    def data_config(self):
        return resolve_data_config(self.backbone, self.image_size)

    def raw_split(self, split: Split) -> Dataset:
        """The untransformed split, built once and cached."""
        if split not in self._splits:
            self._splits[split] = self.build_split(split)
        return self._splits[split]

    def transform(self, split: Split) -> Callable:
        cfg = self.data_config
        if self.augmentation == "fgvc":
            return fgvc_train_transform(cfg) if split == "train" else fgvc_eval_transform(cfg)
        if self.augmentation == "resize":
            return resize_transform(cfg)
        raise ValueError(f"data.augmentation must be 'resize' or 'fgvc', got {self.augmentation!r}")

    def dataset(self, split: Split) -> Dataset:
        return TransformedDataset(self.raw_split(split), self.transform(split))

    def split_source(self, split: Split) -> str:
        """Where ``split``'s samples come from (a list file, an option), for messages."""
        return ""

    def check(self) -> None:
        """Check the data before the model exists: at least 2 classes, an ``image_size`` the
        backbone can take (:func:`~grft_lightning.core.backbones.check_image_size`, on the meta device),
        then build (and so validate) every split: a missing root, list file or image raises an
        error naming it, and so does a split without images. The CLI calls it right after creating
        the DataModule, before the model and its pre-trained weights; the splits are kept, so
        ``setup`` does not read them again."""
        from grft_lightning.data.folders import DatasetError

        classes = self.num_classes
        if classes < 2:
            raise DatasetError(f"data: {self.dataset_name} has {classes} class{'es' if classes != 1 else ''}; "
                               "classification needs at least 2 (data.init_args.num_classes)")
        if self.backbone is not None and self._size_checked != (self.backbone, self.image_size):
            from grft_lightning.core.backbones import check_image_size

            check_image_size(self.backbone, self.image_size)
            self._size_checked = (self.backbone, self.image_size)
        for split in ("train", "val", "test"):
            if len(self.raw_split(split)) == 0:
                source = self.split_source(split)
                raise DatasetError(f"data: the {split} split of {self.dataset_name} is empty"
                                   f"{f' ({source})' if source else ''}; every split needs at least one image")

    def setup(self, stage: str | None = None) -> None:
        # Every split up front (a no-op after check()) so bad data stops the run before training.
        self.check()

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, sampler=None, batch_sampler=None,
                loader_cls: type[DataLoader] = DataLoader) -> DataLoader:
        return loader_cls(
            dataset,
            batch_size=batch_size if batch_sampler is None else 1,  # 1: what DataLoader requires then
            shuffle=shuffle if sampler is None and batch_sampler is None else False,
            sampler=sampler,
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def _eval_loader(self, split: Split) -> DataLoader:
        dataset = self.dataset(split)
        world, _ = _distributed_world()
        sampler = None
        if world > 1:
            # Every sample exactly once across ranks: no padding duplicates in val/test accuracy.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return self._loader(dataset, self.eval_batch_size, shuffle=False, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        """Shuffled from ``(seed, epoch)`` only and dealt across ranks; resumable mid-epoch
        (:mod:`grft_lightning.data.samplers`). The seed is the run's
        (:func:`~grft_lightning.core.seeding.run_seed`), the same on every rank."""
        dataset = self.dataset("train")
        world, rank = _distributed_world()
        sampler = EpochShuffle(dataset, world, rank, seed=run_seed())
        self._train_loader = self._loader(dataset, self.batch_size, shuffle=False, sampler=sampler,
                                          loader_cls=ResumableLoader)
        if self._train_resume is not None:
            self._train_loader.load_state_dict(self._train_resume)
            self._train_resume = None
        return self._train_loader

    # The training loader's position is saved with the DataModule's state in every checkpoint and
    # handed to the loader on resume. Lightning also saves the state of a loader that has one
    # (ResumableLoader does), but in Lightning 2.6 it gives it back only if the loader is created
    # after the checkpoint is restored; here ``trainer.estimated_stepping_batches`` (used by
    # PEFTModule.configure_optimizers) creates it before, and the state would be dropped.
    def state_dict(self) -> dict[str, Any]:
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        resume = state_dict.get("train_loader")
        if resume is None:
            return
        if self._train_loader is not None:  # created already (strategies that restore after setup)
            self._train_loader.load_state_dict(resume)
        else:
            self._train_resume = dict(resume)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Predictions are made on the test split (``python train.py predict``)."""
        return self._eval_loader("test")

    def probe_dataloader(self) -> DataLoader:
        """The whole training split in order, with the evaluation transform, on every rank (not
        dealt): the features the selection's linear probe is fitted on
        (:class:`~grft_lightning.training.callbacks.GradientSelection`, ``head: probe``)."""
        dataset = TransformedDataset(self.raw_split("train"), self.transform("test"))
        return self._loader(dataset, self.eval_batch_size, shuffle=False)

    def selection_dataloader(self, loss: Literal["supcon", "ce"], shuffle: bool = True,
                             drop_last: bool = True, seed: int | None = None,
                             views: Literal["two_augmented", "one"] = "two_augmented") -> DataLoader:
        """Loader for the gradient-selection pass over the training split.

        ``supcon`` yields ``(views, labels)`` with ``views`` of shape ``(B, 2, C, H, W)`` (two
        augmented views per image, docs/methods.md), or ``(B, 1, C, H, W)`` with ``views="one"``
        (the evaluation transform, deterministic); ``ce`` yields ``(images, labels)`` with the
        evaluation transform (deterministic). As in GPS's public code the batches are shuffled and
        the last partial batch is dropped (:class:`SelectionBatches`): a list file grouped by class
        would otherwise give single-class batches, in which SupCon has no negatives. The order
        comes from ``seed`` (default: the run's, :func:`~grft_lightning.core.seeding.run_seed`) alone, so
        it is the same on every rank and in every run with that seed. Under DDP the single-process
        batches are dealt to the ranks: each batch is read once, by one rank, with the same images
        as with one process, so the all-reduced sum of per-batch gradients equals the
        single-process sum (up to the order of float additions).

        Args:
            loss: ``supcon`` (two augmented views) or ``ce`` (the evaluation transform).
            shuffle: shuffle the samples before cutting them in batches.
            drop_last: leave out the last partial batch (kept when the split is smaller than
                one batch: there would be nothing to select from).
            seed: seed of the order (None: the run's seed).
            views: ``supcon``'s views: ``two_augmented`` or ``one`` (above); ignored by ``ce``.
        """
        cfg = self.data_config
        if loss == "supcon" and views == "one":
            transform: Callable = OneView(self.transform("test"))
        elif loss == "supcon":
            transform = TwoViews(supcon_view_transform(cfg))
        elif loss == "ce":
            transform = self.transform("test")
        else:
            raise ValueError(f"selection loss must be 'supcon' or 'ce', got {loss!r}")
        dataset = TransformedDataset(self.raw_split("train"), transform)
        world, rank = _distributed_world()
        seed = run_seed() if seed is None else seed
        batches = SelectionBatches(len(dataset), self.selection_batch_size, world, rank, seed=seed,
                                   shuffle=shuffle, drop_last=drop_last)
        return self._loader(dataset, self.selection_batch_size, shuffle=False, batch_sampler=batches)


class SelectionBatches(Sampler[list[int]]):
    """Batches of the selection pass: GPS's shuffled batching, dealt to the ranks.

    A permutation of ``range(n)`` drawn from ``seed`` alone (the identity with ``shuffle=False``)
    is cut into batches of ``batch_size``; with ``drop_last`` the last partial batch is left out
    (unless there is no full batch); batch ``j`` goes to rank ``j % world``
    (:class:`~grft_lightning.data.samplers.DealtBatches`). Every rank draws the same permutation,
    so the ranks together read exactly the single-process batches, each once.

    Args:
        n: dataset size.
        batch_size: batch size.
        world: number of processes.
        rank: this process's global rank.
        seed: seed of the permutation (the run's seed: the same on every rank).
        shuffle: shuffle before batching.
        drop_last: leave out the last partial batch.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if shuffle:
            self.order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
        else:
            self.order = list(range(n))
        kept = n - n % batch_size if drop_last and n >= batch_size else n
        self.dealt = DealtBatches(kept, batch_size, world, rank)

    def __iter__(self):
        for positions in self.dealt:
            yield [self.order[i] for i in positions]

    def __len__(self) -> int:
        return len(self.dealt)


class ListDataset(Dataset):
    """``(PIL image, label)`` pairs from a list of samples and a loader function."""

    def __init__(self, samples: Sequence[tuple[Any, int]], load: Callable[[Any], Any]):
        self.samples = list(samples)
        self.load = load

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        item, label = self.samples[index]
        return self.load(item), label
