"""The recurrent state of causal FAVOR attention."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["State"]


class State(NamedTuple):
    """Everything causal attention needs from the past, O(M' Dv) per (batch, head).

    The true sums are kv * exp(log_scale) = sum_j phi(k_j) v_j^T and
    z * exp(log_scale) = sum_j phi(k_j); keeping the scale apart lets the state absorb keys
    of any magnitude without overflow (log_scale is the running max of the keys' log scales;
    -inf for an empty state).
    """

    kv: torch.Tensor  # (..., M', Dv)
    z: torch.Tensor  # (..., M')
    log_scale: torch.Tensor  # (...,)

    @classmethod
    def empty(
        cls,
        lead: tuple[int, ...],
        num_outputs: int,
        dv: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> State:
        return cls(
            torch.zeros(*lead, num_outputs, dv, dtype=dtype, device=device),
            torch.zeros(*lead, num_outputs, dtype=dtype, device=device),
            torch.full(tuple(lead), float("-inf"), dtype=dtype, device=device),
        )

    def to(self, *args, **kwargs) -> State:
        return State(*(t.to(*args, **kwargs) for t in self))
