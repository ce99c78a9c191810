"""Token batches for the tiny models of conftest.py (vocab 64): one padded sequence."""

import torch


def padded_batch(batch: int, length: int, *, seed: int, pad_row: int, pad_from: int) -> dict:
    """Random token ids (batch, length) and an attention mask with row ``pad_row`` padded
    from position ``pad_from`` on (0 = padding, the transformers convention)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[pad_row, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}
