"""PerformerEncoder (bidirectional) and PerformerLM (causal, with O(1)-per-token generation)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.attention import AttentionState
from ..nn.redraw import mix_seed, redraw_features
from .block import Block
from .config import PerformerConfig

__all__ = ["PerformerEncoder", "PerformerLM"]


class _Trunk(nn.Module):
    """Embedding, positions, blocks, final norm; shared by encoder and LM."""

    def __init__(self, config: PerformerConfig, *, causal: bool) -> None:
        super().__init__()
        if not isinstance(config, PerformerConfig):
            raise TypeError(f"config must be a PerformerConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_len, config.dim) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=causal) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        # (vocab,): added to every position's logits; zeros, so a new model's outputs do not
        # depend on whether it has one
        self.logit_bias = nn.Parameter(torch.zeros(config.vocab_size)) if config.output_bias else None
        self._init_weights()
        redraw_features(self, config.seed, 0)

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 depth);
        # drawn from config.seed, so equal configs give equal models (and a softmax baseline
        # starts from the same weights as its FAVOR twin)
        gen = torch.Generator().manual_seed(mix_seed(self.config.seed, 3))
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = (
                    0.02 / math.sqrt(2 * self.config.depth)
                    if name.endswith(("out_proj.weight", "mlp.2.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std, generator=gen)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def _check_tokens(self, idx: torch.Tensor, *, check_range: bool = True) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.long, torch.int32) or idx.ndim != 2:
            desc = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be an integer tensor (B, L), got {desc}")
        # an id outside the vocabulary is otherwise an IndexError from inside the embedding on
        # a CPU and, on a GPU, a device-side assert that ends the CUDA context; so this is a
        # host sync, one per forward (skipped for the tokens generate() samples itself, and on
        # the meta device, which has no values)
        check_range = check_range and idx.numel() and idx.device.type != "meta"
        if check_range and not bool(((idx >= 0) & (idx < self.config.vocab_size)).all()):  # host sync
            lo, hi = int(idx.min()), int(idx.max())  # host sync: only on the way to raising
            raise ValueError(f"idx must hold token ids in [0, vocab_size={self.config.vocab_size}), got [{lo}, {hi}]")

    @staticmethod
    def _check_states(states, depth: int) -> None:
        if states is None:
            return
        if not isinstance(states, (list, tuple)) or len(states) != depth:
            got = f"{len(states)} entries" if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(f"state must be a list of one AttentionState per layer ({depth}), got {got}")
        for st in states:
            if not isinstance(st, AttentionState):
                raise TypeError(f"state must hold favor.nn.AttentionState entries, got {type(st).__name__}")

    def hidden(self, idx, *, key_padding_mask=None, states=None, return_state=False, _check_range=True):
        self._check_tokens(idx, check_range=_check_range)
        self._check_states(states, self.config.depth)
        offset = states[0].position if states else 0
        x = self.embed(idx)
        if self.pos_embed is not None:
            end = offset + idx.shape[1]
            if end > self.config.max_len:
                raise ValueError(
                    f"sequence reaches position {end} but learned positions stop at max_len={self.config.max_len}"
                )
            x = x + self.pos_embed(torch.arange(offset, end, device=idx.device))
        x = self.drop(x)
        new_states = []
        for i, block in enumerate(self.blocks):
            x, st = block(
                x, key_padding_mask=key_padding_mask, state=states[i] if states else None, return_state=return_state
            )
            new_states.append(st)
        return self.norm(x), new_states


class PerformerEncoder(_Trunk):
    """Bidirectional Performer: tokens (B, L) -> hidden states (B, L, dim)."""

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__(config, causal=False)

    def forward(self, idx: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hidden(idx, key_padding_mask=key_padding_mask)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits through the (tied) embedding, for masked-LM heads."""
        logits = hidden @ self.embed.weight.T
        return logits if self.logit_bias is None else logits + self.logit_bias


class PerformerLM(_Trunk):
    """Causal Performer language model with tied (or untied) output embedding.

    ``forward(idx)`` -> logits (B, L, vocab). With ``return_state=True`` (or ``state=``) it
    returns ``(logits, state)`` where state is a list of per-layer AttentionState, so a
    sequence can be continued: with FAVOR the state's size is independent of context length.
    """

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__(config, causal=True)
        self.head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        if self.head is not None:
            nn.init.normal_(
                self.head.weight, std=0.02, generator=torch.Generator().manual_seed(mix_seed(config.seed, 4))
            )

    def forward(
        self,
        idx: torch.Tensor,
        *,
        state: list[AttentionState] | None = None,
        return_state: bool = False,
        _check_range: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, list[AttentionState]]:
        stateful = state is not None or return_state
        h, new = self.hidden(idx, states=state, return_state=stateful, _check_range=_check_range)
        logits = h @ self.embed.weight.T if self.head is None else self.head(h)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return (logits, new) if stateful else logits

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``idx`` (B, L0) by ``max_new_tokens`` sampled tokens -> (B, L0 + N).

        The prompt is run once; each new token then costs one recurrent step (constant
        time and memory in the context length for FAVOR; a growing key/value cache for
        softmax). ``temperature=0`` is greedy; ``top_k`` keeps the k most likely tokens.
        Call ``model.eval()`` first if the model has dropout.
        """
        self._check_tokens(idx)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if idx.shape[1] == 0:
            raise ValueError("idx must hold at least one prompt token per row")
        out = [idx]
        if max_new_tokens == 0:
            return idx
        logits, state = self(idx, return_state=True, _check_range=False)  # checked above
        for i in range(max_new_tokens):
            nxt = sample(logits[:, -1, :], temperature=temperature, top_k=top_k, generator=generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:  # sampled ids are in range: no check (a host sync)
                logits, state = self(nxt, state=state, _check_range=False)
        return torch.cat(out, dim=1)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits (B, V) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # a CPU generator with a GPU model: draw where the generator is, so that one seed
        # gives the same tokens on every device (host sync: one small copy per token)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)
