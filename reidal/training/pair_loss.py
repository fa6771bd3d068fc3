"""A loss on the answers themselves, beside SpCL's hybrid-memory loss (OURS, docs/method.md).

SpCL learns from pseudo-labels; the answers reach it only through NP3, which moves items
between clusters. Where clusters are poor (weak features: many small, impure clusters) the
answers' direct content, "these two are the same animal" / "these two are not", is mostly
lost. This loss uses it: every pair the answers fix, answered or implied (SAME answers are
closed transitively into must-link groups, a DIFFERENT answer separates the two groups
entirely: :meth:`reidal.core.constraints.ConstraintSet.ml_groups` / ``cl_group_edges``), is a
cosine contrastive term (Hadsell et al. 2006, on cosine similarity)::

    same:       1 - s(i, j)
    different:  max(0, s(i, j) - margin)

with ``s`` the similarity of a batch item's embedding to its partner's *memory* feature
(the hybrid memory holds one for every item), so an answer counts whenever either of its
two images is in the batch, not only when PK sampling happens to draw both. The two kinds
are averaged separately and added (a batch with many implied SAME pairs does not drown its
few DIFFERENT ones). Its weight is ``TrainConfig.pair_loss_weight``, its margin
``TrainConfig.pair_margin``.
"""

from __future__ import annotations

import numpy as np
import torch

from reidal.core.constraints import ConstraintSet


class AnswerPairs:
    """The answers' known relations as lookup tensors (rebuilt whenever the answers change).

    Only items in a must-link group of 2+ or in a group that a DIFFERENT answer touches
    take part; ``members`` are those items, ``groups`` their compact group ids, ``apart``
    (G, G) says which groups a DIFFERENT answer separates.
    """

    def __init__(self, constraints: ConstraintSet, device: torch.device) -> None:
        n = constraints.n_items
        g = np.asarray(constraints.ml_groups(), dtype=np.int64)
        edges = np.asarray(constraints.cl_group_edges(), dtype=np.int64).reshape(-1, 2)
        size = np.bincount(g, minlength=int(g.max()) + 1 if n else 0)
        involved = size >= 2
        involved[edges.reshape(-1)] = True
        compact = np.full(involved.size, -1, dtype=np.int64)
        compact[involved] = np.arange(int(involved.sum()))
        self.item_group = torch.from_numpy(compact[g] if n else np.empty(0, np.int64)).to(device)
        members = np.flatnonzero(compact[g] >= 0) if n else np.empty(0, np.int64)
        self.members = torch.from_numpy(members).to(device)
        self.groups = self.item_group[self.members]
        n_groups = int(involved.sum())
        apart = torch.zeros(n_groups, n_groups, dtype=torch.bool)
        if len(edges):
            a, b = torch.from_numpy(compact[edges[:, 0]]), torch.from_numpy(compact[edges[:, 1]])
            apart[a, b] = True
            apart[b, a] = True
        self.apart = apart.to(device)

    @property
    def empty(self) -> bool:
        return self.members.numel() == 0

    def loss(self, emb: torch.Tensor, idx: torch.Tensor, memory: torch.Tensor,
             margin: float) -> torch.Tensor:
        """The contrastive loss of the batch ``emb`` (B, d) of items ``idx`` against the memory
        features (n, d) of their known partners; 0 (with a graph) when none has any."""
        zero = emb.sum() * 0.0
        if self.empty:
            return zero
        gb = self.item_group[idx]
        has = gb >= 0
        if not bool(has.any()):
            return zero
        e, gb, ib = emb[has], gb[has], idx[has]
        s = e @ memory.index_select(0, self.members).t().to(e.dtype)  # (b, r)
        same = (gb[:, None] == self.groups[None, :]) & (ib[:, None] != self.members[None, :])
        diff = self.apart[gb][:, self.groups]
        out = zero
        if bool(same.any()):
            out = out + (1.0 - s[same]).mean()
        if bool(diff.any()):
            out = out + torch.relu(s[diff] - margin).mean()
        return out
