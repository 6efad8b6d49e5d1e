"""Keep strategy ids stable from epoch to epoch by matching cluster prototypes."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["StrategyTracker", "prototype_similarity"]


def prototype_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(K, M) histogram intersection ``sum_p min(a_k(p), b_m(p))`` of relevance distributions
    (rows summing to 1): 1 for identical maps, 0 for disjoint ones."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return np.zeros((len(a), len(b)))
    return np.minimum(a[:, None, :], b[None, :, :]).sum(-1)


class StrategyTracker:
    """Give each cluster of one class a strategy id that persists across epochs.

    Each epoch, the clusters' signatures (mean relevance distributions, see
    :attr:`SpRAyResult.signatures <xai_callbacks.spray.SpRAyResult>`) are matched one-to-one to the
    known strategies by maximal total similarity (Hungarian algorithm,
    :func:`prototype_similarity`); a match needs ``similarity >= min_similarity``. Unmatched
    clusters start new strategies. Each strategy's signature is replaced by its latest one, and
    its share of the class is recorded per epoch (:attr:`history`).

    Args:
        min_similarity: the least histogram intersection for a cluster to continue a strategy.
    """

    def __init__(self, min_similarity: float = 0.8):
        if not 0 <= min_similarity <= 1:
            raise ValueError(f"min_similarity must be in [0, 1], got {min_similarity}")
        self.min_similarity = min_similarity
        self.signatures: dict[int, np.ndarray] = {}
        self.history: dict[int, dict[int, float]] = {}
        self.next_id = 0

    def update(self, signatures: np.ndarray, shares: np.ndarray, epoch: int) -> list[int]:
        """Strategy id of each of this epoch's K clusters.

        Args:
            signatures: (K, D) relevance distributions of the clusters.
            shares: (K,) each cluster's share of the class.
            epoch: the epoch these clusters come from.
        """
        signatures = np.asarray(signatures, dtype=np.float64)
        known = list(self.signatures)
        ids = [-1] * len(signatures)
        if known and len(signatures):
            sim = prototype_similarity(signatures, np.stack([self.signatures[i] for i in known]))
            for r, c in zip(*linear_sum_assignment(-sim)):
                if sim[r, c] >= self.min_similarity:
                    ids[r] = known[c]
        for r in range(len(ids)):
            if ids[r] < 0:
                ids[r] = self.next_id
                self.next_id += 1
        for r, sid in enumerate(ids):
            self.signatures[sid] = signatures[r]
            self.history.setdefault(sid, {})[int(epoch)] = float(shares[r])
        return ids

    def share_curves(self) -> tuple[list[int], dict[str, list[float]]]:
        """Epochs seen and, per strategy, its share of the class at each (0 where absent)."""
        epochs = sorted({e for h in self.history.values() for e in h})
        return epochs, {f"strategy {sid}": [h.get(e, 0.0) for e in epochs] for sid, h in sorted(self.history.items())}

    def state_dict(self) -> dict:
        return {"min_similarity": self.min_similarity, "next_id": self.next_id,
                "signatures": {int(k): v.tolist() for k, v in self.signatures.items()},
                "history": {int(k): {int(e): float(s) for e, s in h.items()} for k, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.min_similarity = state.get("min_similarity", self.min_similarity)
        self.next_id = int(state.get("next_id", 0))
        self.signatures = {int(k): np.asarray(v, dtype=np.float64) for k, v in state.get("signatures", {}).items()}
        self.history = {int(k): {int(e): float(s) for e, s in h.items()} for k, h in state.get("history", {}).items()}
