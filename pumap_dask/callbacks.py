"""Training callbacks shipped with the package (called as ``callback(epoch, loss, model)``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .params import positive_int, real

logger = logging.getLogger(__name__)
class EarlyStopping:
    """Stop training when the epoch loss stops improving (a plateau).

    An epoch improves when its loss is below ``best - min_delta * abs(best)`` (a
    *relative* decrease of more than ``min_delta``; the UMAP loss has no natural scale, so
    a relative threshold works the same for any data), where ``best`` is the lowest loss
    seen so far. Training stops after ``patience`` consecutive epochs without an
    improvement. Pass it in the estimator's ``callbacks``; one instance may be reused
    across fits (its state resets at epoch 0).

    Parameters
    ----------
    patience
        Epochs without improvement tolerated before stopping (>= 1).
    min_delta
        Relative improvement that counts (>= 0); 0 counts any decrease.

    Attributes
    ----------
    best_ : float
        Lowest loss seen.
    best_epoch_ : int
        Epoch of ``best_``.
    stopped_epoch_ : int or None
        Epoch after which it asked training to stop, or None.

    Examples
    --------
    >>> from pumap_dask import ParametricUMAP, EarlyStopping
    >>> model = ParametricUMAP(n_epochs=200, callbacks=[EarlyStopping(patience=5)])
    """

    def __init__(self, patience: int = 5, min_delta: float = 1e-3) -> None:
        self.patience = positive_int("patience", patience)
        self.min_delta = real("min_delta", min_delta, low=0.0)
        self._reset()

    def _reset(self) -> None:
        self.best_ = math.inf
        self.best_epoch_ = -1
        self.stopped_epoch_: int | None = None
        self._wait = 0

    def __call__(self, epoch: int, loss: float, model: Any = None) -> bool:
        """Record one epoch's loss; True when training should stop."""
        if epoch == 0 or self.stopped_epoch_ is not None:
            self._reset()
        if not math.isfinite(loss):
            self.stopped_epoch_ = epoch
            logger.warning("early stopping: loss is %s at epoch %d", loss, epoch + 1)
            return True
        if loss < self.best_ - self.min_delta * abs(self.best_) or self.best_epoch_ < 0:
            self.best_, self.best_epoch_, self._wait = float(loss), epoch, 0
            return False
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch_ = epoch
            logger.info("early stopping after epoch %d: no relative loss decrease above "
                        "%g for %d epochs (best %.5f at epoch %d)", epoch + 1, self.min_delta,
                        self.patience, self.best_, self.best_epoch_ + 1)
            return True
        return False

    def __repr__(self) -> str:
        return f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta})"
