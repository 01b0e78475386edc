"""
The batch loader: a stage's batches, step by step, built ahead of use by worker processes.
An epoch's order and each micro-batch's noise candidates are fixed by the seed, the epoch and
the step, wherever and whenever a batch is built: a resumed run, a run with workers and a run
under torchrun all meet the same batches.
"""
import functools
import math
import numpy as np
import torch

from nanotcmp.data import dialogue_batches, finetune_batch, padding, pretrain_batch, targets_batch, window_targets
from nanotcmp.processes import rank, world

EVAL_BATCH = 64  # samples or windows; without gradients, large batches are cheap


def step_chunks(s, items, split, rng):
    """One epoch's global batches, in order: windows (pre-training) or dialogue-ordered samples
    (fine-tuning). A batch too small to give each micro-batch an item is left out."""
    if s.stage == "pretrain":
        order = rng.permutation(len(items))
        chunks = [[items[j] for j in order[i:i + s.batch_size]] for i in range(0, len(items), s.batch_size)]
    else:
        chunks = dialogue_batches(split, s.batch_size, rng)
    return [c for c in chunks if len(c) >= s.micro_batches]


def steps_per_epoch(s, items, split):
    return len(step_chunks(s, items, split, np.random.default_rng(0)))  # the same for every epoch's order


def micro_batch(s, split, modalities, items, rng):
    """A micro-batch of items -> (batch, {modality: (padded, all) positions}). A pre-training
    micro-batch draws its noise candidates, and so its CLIP negatives, from itself."""
    if s.stage == "pretrain":
        batch = pretrain_batch(split, items, s.k, rng, modalities, max_padding=s.max_padding, grid=s.shape_grid)
    else:
        batch = finetune_batch(split, items, modalities, max_padding=s.max_padding, grid=s.shape_grid)
    return batch, {key: padding(batch, key) for key in ("text", "audio") if key + "_mask" in batch}


def step_batches(s, items, split, modalities, per_epoch, step):
    """-> (the step's number of items, this process's micro-batches of them: [(share of the step's
    items, batch, {modality: (padded, all) positions})]); per_epoch: steps an epoch"""
    epoch, i = divmod(step, per_epoch)
    chunk = step_chunks(s, items, split, np.random.default_rng((s.seed, epoch)))[i]
    shards = np.array_split(np.arange(len(chunk)), s.micro_batches)
    r, w = rank(), world()
    mine = range(r * s.micro_batches // w, (r + 1) * s.micro_batches // w)  # this process's shards
    return len(chunk), [(len(shards[g]) / len(chunk), *micro_batch(
        s, split, modalities, [chunk[j] for j in shards[g]], np.random.default_rng((s.seed, epoch, i, g))))
        for g in mine]


class Batches(torch.utils.data.Dataset):
    """Batches made on demand, make(i) for i < n: what a DataLoader's worker processes build while
    the model works on the ones before"""

    def __init__(self, make, n):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


def ahead(make, n, workers, start=0):
    """make(start), ..., make(n - 1), in order, built by `workers` processes up to 4 batches each
    ahead of use (0 workers: here, when asked for). The batches stay on the CPU: data.to_device
    pins them on CUDA in the caller's thread, as a pinning thread's CUDA calls would break the
    capture of a CUDA graph."""
    return torch.utils.data.DataLoader(
        Batches(make, n), batch_size=None, sampler=range(start, n), num_workers=workers,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,  # the workers share the memory-mapped splits
        generator=torch.Generator())  # the workers' seeds come from here: the global generator is dropout's


def eval_targets(split, wins, seed, i):
    """The i-th evaluation batch's windows, targets and their noise candidates: 10 a target, from
    the whole split, fixed by the seed and i, so that every evaluation meets the same ones"""
    return window_targets(split, wins[i * EVAL_BATCH:(i + 1) * EVAL_BATCH], 11, np.random.default_rng((seed, i)),
                          in_batch=False)


def eval_batch(s, split, stage, items, modalities, i):
    """The i-th evaluation batch of a split's items: samples ("finetune"), or windows (eval_targets)"""
    if stage == "finetune":
        samples = items[i * EVAL_BATCH:(i + 1) * EVAL_BATCH]
        return finetune_batch(split, samples, modalities, s.max_padding, s.shape_grid)
    return targets_batch(split, *eval_targets(split, items, s.seed, i), modalities, s.max_padding, s.shape_grid)


def eval_batches(s, split, stage, items, modalities):
    """A split's evaluation batches, EVAL_BATCH items each, built ahead of use"""
    return ahead(functools.partial(eval_batch, s, split, stage, items, modalities), math.ceil(len(items) / EVAL_BATCH),
                 s.workers)
