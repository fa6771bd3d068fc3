"""PK batches over pseudo-labels: P identities x K images, as SpCL's sampler draws them.

SpCL's ``RandomMultipleGallerySampler`` (camera-free branch) makes one pass over the
pseudo-identities in random order; for each it takes a random anchor image and K-1 other
images of the same identity (without replacement when it has enough, with replacement
otherwise). An un-clustered image is an identity of its own and contributes the anchor only.
The DataLoader then cuts that stream into batches of P x K images, ignoring identity
boundaries, and a new pass starts when the stream runs out. This module builds the same
stream with vectorised numpy (no loop over identities) and cuts it the same way.

Under data parallelism every process builds the same stream (same seed) and takes its own
contiguous slice of each batch (:func:`shard_batch`), so the processes together see the
batch one process would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def pk_pass(labels: np.ndarray, num_instances: int, rng: np.random.Generator) -> np.ndarray:
    """One pass over every identity in random order: anchor + K-1 others, concatenated."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if labels.min() < 0:
        raise ValueError("labels must be >= 0 (give un-clustered items labels of their own)")
    k = int(num_instances)
    if k < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    uniq, lab = np.unique(labels, return_inverse=True)
    lab = lab.reshape(-1)
    n_id = uniq.size
    # members of each identity in random order: the first is the anchor
    order = np.lexsort((rng.random(labels.size), lab))
    size = np.bincount(lab, minlength=n_id)
    start = np.r_[0, np.cumsum(size)[:-1]]
    visit = rng.permutation(n_id)
    s = size[visit]
    # images each visited identity contributes: 1 for a singleton, K otherwise
    take = np.where(s > 1, k, 1)
    id_of = np.repeat(np.arange(n_id), take)  # position within the visit order
    slot = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
    ident_start = start[visit][id_of]
    ident_size = s[id_of]
    # slot 0 = anchor (position 0); other slots: without replacement -> positions 1..K-1 of
    # the shuffled members; with replacement (fewer than K members) -> a uniform draw among
    # the members other than the anchor
    enough = ident_size >= k
    draw = 1 + np.floor(rng.random(slot.size) * np.maximum(ident_size - 1, 1)).astype(np.int64)
    pos = np.where(slot == 0, 0, np.where(enough, slot, draw))
    return order[ident_start + pos]


def pk_batches(labels: np.ndarray, num_instances: int, batch_size: int, n_batches: int,
               rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``n_batches`` index batches of ``batch_size`` cut from consecutive passes.

    Like SpCL's loader (``drop_last=True`` inside an endless iterator): a batch never spans two
    passes, and a pass's tail shorter than a batch is dropped. OURS: when a whole pass holds
    fewer images than one batch (few, small identities), consecutive passes are joined to
    fill it, where SpCL's loader would yield nothing.
    """
    if int(batch_size) < 1 or int(n_batches) < 0:
        raise ValueError(f"batch_size must be >= 1 and n_batches >= 0, got {batch_size}, "
                         f"{n_batches}")
    if np.asarray(labels).size < batch_size:
        raise ValueError(f"a batch of {batch_size} images needs at least as many items, got "
                         f"{np.asarray(labels).size}")
    made = 0
    while made < n_batches:
        stream = pk_pass(labels, num_instances, rng)
        full = stream.size // batch_size
        if full == 0:  # every identity tiny: lengthen the pass until it fills a batch
            while stream.size < batch_size:
                stream = np.concatenate([stream, pk_pass(labels, num_instances, rng)])
            full = stream.size // batch_size
        for b in range(min(full, n_batches - made)):
            yield stream[b * batch_size:(b + 1) * batch_size]
            made += 1


def shard_batch(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's contiguous slice of a global batch (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    bounds = np.linspace(0, batch.size, world_size + 1).round().astype(np.int64)
    return batch[bounds[rank]:bounds[rank + 1]]
