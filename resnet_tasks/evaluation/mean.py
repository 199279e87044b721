"""A weighted mean as a metric whose update reads nothing back to the host (e.g. the validation loss)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class WeightedMean(Metric):
    """The mean of values weighted by a count (a batch's mean loss and its batch size), summed across DDP ranks.

    NaN values are left out with their weights, as torchmetrics' `MeanMetric` does, but by masking on the device
    instead of checking (which waits for the device) and without its warning.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dtype = torch.get_default_dtype()
        self.add_state("total", default=torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=dtype), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float = 1.0) -> None:
        """Add `value` (a tensor of any shape, each element weighted by `weight`, a host number)."""
        value = value.detach().to(self.total.dtype).reshape(-1)
        defined = ~torch.isnan(value)
        self.total += torch.where(defined, value * weight, 0.0).sum()
        self.weight += defined.to(self.weight.dtype).sum() * weight

    def compute(self) -> Any:
        return self.total / self.weight
