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


def unpadded_batches(count: int, batch: int, length: int, *, seed: int) -> list[dict]:
    """``count`` batches of random token ids (batch, length) from one generator, no padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 64, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.long)})
    return out


def decoded_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of ``ids`` (1, L) from a cached decoder: the first ``prompt`` tokens in one call,
    then one token per call with the cache; (1, L, vocab), to compare with teacher forcing."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :prompt], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    return torch.cat(steps, 1)
