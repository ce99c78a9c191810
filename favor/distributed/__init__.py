"""favor.distributed: scaling FAVOR attention out with torch.distributed.

- ``sequence_parallel_attention``: causal attention over a sequence split across ranks,
  one all-gather of O(M' Dv) states per call (LASP-2 style), exact and differentiable.
- ``sequence_parallel(model)`` / ``sequence_parallel_forward``: a model's causal
  FavorAttention layers attend across ranks (PerformerLM on a slice of positions).
- ``shard_sequence`` / ``shard_bounds``: contiguous slices of a batch along the sequence.
- ``count_communication``: tally the bytes the sequence-parallel collectives move.
"""

from .collectives import CommCounter, all_gather_rows, count_communication
from .modules import sequence_parallel, sequence_parallel_forward
from .rank_state import rank_state, rank_state_reference
from .sequence import combine_states, prefix_state, sequence_parallel_attention, state_bytes, state_numel
from .sharding import shard_bounds, shard_sequence

__all__ = [
    "sequence_parallel_attention",
    "sequence_parallel",
    "sequence_parallel_forward",
    "prefix_state",
    "combine_states",
    "rank_state",
    "rank_state_reference",
    "state_bytes",
    "state_numel",
    "all_gather_rows",
    "count_communication",
    "CommCounter",
    "shard_bounds",
    "shard_sequence",
]
