"""The order in which samples are read, with one process or many, and after a resume.

* :class:`EpochShuffle`: the training order is a permutation drawn from ``(seed, epoch)`` alone
  and dealt across ranks (``torch``'s ``DistributedSampler``, which is also what Lightning puts
  in under DDP). A plain ``shuffle=True`` loader would draw its permutation from the global RNG,
  whose state a resumed run does not have: after a resume the order would change.
* :class:`ResumableLoader`: a training ``DataLoader`` that Lightning checkpoints mid-epoch
  (it has ``state_dict``/``load_state_dict``). Without it a run resumed after ``k`` of an
  epoch's ``N`` batches reads the *first* ``N - k`` batches of a fresh iteration: some samples
  twice in that epoch, others never. With it, it reads batches ``k .. N-1`` of the same order.
* :class:`DealtBatches`: the selection pass under DDP. Batch ``j`` of the single-process batching
  goes to rank ``j % world``, so the ranks together see exactly the single-process batches (the
  same images in each, a partial last batch included) and the all-reduced gradient sum equals
  the single-process sum up to the order of the floating-point additions.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class EpochShuffle(DistributedSampler):
    """Shuffle with ``(seed, epoch)`` only; rank ``r`` of ``world`` reads every ``world``-th index.

    Lightning calls ``set_epoch`` before every epoch. Like ``DistributedSampler`` with
    ``drop_last=False``, the permutation is padded by wrapping around so that every rank reads
    the same number of samples.

    Args:
        dataset: the training dataset.
        num_replicas: number of processes.
        rank: this process's global rank.
        seed: the run's seed (the same on every rank, or the shards would overlap).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0  # indices of this rank's shard to leave out of the next iteration (resume)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` (with an :class:`EpochShuffle` sampler) that resumes mid-epoch.

    Its state is ``{"epoch", "batches"}``: the epoch being read and how many of its batches were
    handed out (every rank reads the same number, so rank 0's state fits all). Lightning saves it
    in each checkpoint (``loops.fit_loop.state_dict.combined_loader``) and gives it back before
    the resumed epoch; the next iteration of that epoch then starts at that batch. A state taken
    at the end of an epoch points at the start of the next one.
    """

    _position: tuple[int, int] = (0, 0)  # (epoch, batches handed out in it)
    _resume: tuple[int, int] | None = None

    def __iter__(self):
        # A generator: nothing is read (not even the sampler) before the first batch is asked
        # for, which Lightning does after set_epoch.
        epoch = self.sampler.epoch
        start = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                start = self._resume[1]
                self.sampler.skip = start * self.batch_size
            self._resume = None
        self._position = (epoch, start)
        for batch in super().__iter__():
            self._position = (epoch, self._position[1] + 1)
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._position
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))
        self.sampler.set_epoch(int(state["epoch"]))


class DealtBatches(Sampler[list[int]]):
    """Batch sampler: ``range(n)`` cut in batches of ``batch_size``, batch ``j`` to rank ``j % world``.

    Args:
        n: dataset size.
        batch_size: batch size (the single-process batching is reproduced exactly).
        world: number of processes.
        rank: this process's global rank.
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0):
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank

    def _starts(self) -> range:
        return range(self.rank * self.batch_size, self.n, self.world * self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in self._starts():
            yield list(range(start, min(start + self.batch_size, self.n)))

    def __len__(self) -> int:
        return len(self._starts())
