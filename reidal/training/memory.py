"""SpCL's hybrid memory: one feature per training item, a contrastive loss over clusters + items.

The memory holds an L2-normalised feature for every training item. Each epoch the item's
pseudo-label says which *class* it belongs to: a cluster (all its members share the label)
or, for an un-clustered item, a class of its own. A batch embedding f_i is scored against
every class c by its similarity to the class centroid (the mean of the members' memory
features: SpCL averages the similarities, which is the same number), divided by the
temperature; the loss is the cross-entropy of the item's own class (SpCL eq. 1-2, with
cluster centroids and un-clustered instances as the two kinds of prototypes), with SpCL's
1e-6 inside the logarithm (see LOG_EPS).

After each step the memory features of the batch's items move towards the new embeddings,
``m * old + (1 - m) * new``, renormalised (SpCL's momentum 0.2: the new embedding weighs
0.8). SpCL does this one batch element at a time inside the autograd backward; here it is
an ``index_copy_`` per round of distinct indices, so an item drawn twice in one batch gets
the two updates in batch order, exactly as the sequential loop gives them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: SpCL takes log(p + 1e-6), not log p: it caps an item's loss at -log(1e-6) ~ 13.8, so an
#: item far from its own class (typically one just relabelled) pushes no huge gradient.
LOG_EPS = 1e-6


class HybridMemory(nn.Module):
    """Instance memory + cluster-centroid / instance contrastive loss (SpCL's ``HybridMemory``).

    ``features`` (num_samples, num_features) and ``labels`` (num_samples,) are buffers, so they
    travel with ``state_dict`` (checkpoints) and ``.to(device)``. ``labels`` must be compact:
    0..L-1 with every un-clustered item holding a label of its own (see
    ``reidal.training.pseudo_labels.compact_with_singletons``).
    """

    def __init__(self, num_features: int, num_samples: int, temp: float = 0.05,
                 momentum: float = 0.2) -> None:
        super().__init__()
        if int(num_features) < 1 or int(num_samples) < 1:
            raise ValueError(
                f"num_features and num_samples must be >= 1, got {num_features}, {num_samples}"
            )
        if not float(temp) > 0:
            raise ValueError(f"temp must be > 0, got {temp}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_features = int(num_features)
        self.num_samples = int(num_samples)
        self.temp = float(temp)
        self.momentum = float(momentum)
        self.register_buffer("features", torch.zeros(self.num_samples, self.num_features))
        self.register_buffer("labels", torch.arange(self.num_samples, dtype=torch.long))

    @torch.no_grad()
    def init_features(self, features: torch.Tensor) -> None:
        """Set every item's memory feature (L2-normalised here), e.g. from the first embedding."""
        if tuple(features.shape) != (self.num_samples, self.num_features):
            raise ValueError(
                f"features must be ({self.num_samples}, {self.num_features}), "
                f"got {tuple(features.shape)}"
            )
        self.features.copy_(F.normalize(features.float(), dim=1))

    @torch.no_grad()
    def set_labels(self, labels: torch.Tensor) -> None:
        """Install the epoch's compact pseudo-labels (0..L-1, every label used)."""
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.labels.device)
        if tuple(labels.shape) != (self.num_samples,):
            raise ValueError(f"labels must have shape ({self.num_samples},), got "
                             f"{tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or
                               torch.bincount(labels).eq(0).any()):
            raise ValueError("labels must be compact: 0..L-1 with every label used, no -1 "
                             "(give every un-clustered item a label of its own)")
        self.labels.copy_(labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def centroids(self) -> torch.Tensor:
        """(L, num_features) mean memory feature of each class (not renormalised, as SpCL)."""
        n_cls = self.num_classes
        sums = torch.zeros(n_cls, self.num_features, device=self.features.device,
                           dtype=self.features.dtype)
        sums.index_add_(0, self.labels, self.features)
        counts = torch.bincount(self.labels, minlength=n_cls).clamp_min(1)
        return sums / counts.unsqueeze(1).to(sums.dtype)

    def forward(self, inputs: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of each input's own class over all classes (centroids / temp).

        ``inputs`` (B, num_features) are L2-normalised embeddings with gradient; ``indexes``
        (B,) the items they are. The memory is not updated here: call :meth:`update` after
        the backward pass (SpCL updates inside backward, with the same forward embeddings).
        """
        logits = inputs.float() @ self.centroids().t() / self.temp
        p = torch.softmax(logits, dim=1)
        return F.nll_loss(torch.log(p + LOG_EPS), self.labels[indexes])

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, indexes: torch.Tensor) -> None:
        """Momentum update of the memory features of ``indexes`` with ``inputs`` (detached).

        Repeated indices are applied in batch order: round r updates the r-th occurrence of
        every index, so each round's indices are distinct and one ``index_copy_`` does it.
        """
        x = inputs.detach().to(self.features.dtype)
        idx = indexes.to(self.features.device, torch.long)
        if idx.numel() == 0:
            return
        # occurrence rank of each position among equal indices (0 for the first one)
        order = torch.sort(idx, stable=True).indices
        sorted_idx = idx[order]
        start = torch.ones_like(sorted_idx, dtype=torch.bool)
        start[1:] = sorted_idx[1:] != sorted_idx[:-1]
        pos = torch.arange(idx.numel(), device=idx.device)
        group_start = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
        rank = torch.empty_like(idx)
        rank[order] = pos - group_start
        m = self.momentum
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            rows = idx[sel]
            new = m * self.features.index_select(0, rows) + (1.0 - m) * x[sel]
            self.features.index_copy_(0, rows, F.normalize(new, dim=1))
