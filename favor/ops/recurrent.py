"""One token at a time: O(M' Dv) per token whatever the context length (decoding)."""

from __future__ import annotations

import math

import torch

from ..features.feature_map import FeatureMap
from . import chunking, normalise
from .checks import check_feature_map, check_scale, check_state, compute_dtype
from .local.dispatch import exact_steps
from .local.gain import far_log_const
from .local.recurrent import ExactState
from .local.spec import ExactTerms
from .state import State
from .step_features import step_features

__all__ = ["step", "steps", "STEP_MAX_QUERIES"]


def step(
    state: State | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    scale: float | None = None,
    exact=None,
    far_log_gain: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, State]:
    """Attend from one new token: q, k (..., D), v (..., Dv) -> (out (..., Dv), new state).

    ``state=None`` starts an empty context. Equal (to round-off) to causal attention over
    the whole sequence, one position at a time. ``exact`` (a ``favor.ExactTerms``): the
    state is a ``favor.ExactState`` (far state, ring of recent keys, sinks; fixed size);
    ``far_log_gain`` weighs the far keys' estimate by exp(g), as in ``favor.attention``.
    """
    check_feature_map(feature_map)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < 1:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor of shape (..., D), got {got}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim D, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("q and k must have a head dim D >= 1, got D=0")
    feature_map.check_dim(q, "q")
    try:
        # equal shapes (the usual case) skip torch.broadcast_shapes, a Python-level
        # function that costs as much as a third of a small step
        lead = q.shape[:-1]
        if not lead == k.shape[:-1] == v.shape[:-1]:
            lead = torch.broadcast_shapes(q.shape[:-1], k.shape[:-1], v.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"leading dims of q {tuple(q.shape[:-1])}, k {tuple(k.shape[:-1])}, v {tuple(v.shape[:-1])} do not broadcast"
        ) from None
    if feature_map.stabilizer == "official":
        raise ValueError(
            "stabilizer='official' shifts keys by a max over the whole key sequence, so it cannot "
            "run token by token; use stabilizer='exact'"
        )
    out_dtype, dtype = v.dtype, compute_dtype(q.dtype)
    root = check_scale(scale, q.shape[-1]) ** 0.5
    q1, k1, v1 = q.to(dtype).unsqueeze(-2), k.to(dtype).unsqueeze(-2), v.to(dtype)
    if exact is None and far_log_gain is not None:
        raise ValueError("far_log_gain weighs FAVOR's far keys against exact terms: it needs exact=ExactTerms(...)")
    if exact is not None:
        terms = ExactTerms.coerce(exact)
        if state is not None and not isinstance(state, ExactState):
            raise TypeError(
                f"with exact terms the state must be a favor.ExactState or None, got {type(state).__name__}"
            )
        log_const = far_log_const(far_log_gain, tuple(lead), dtype=dtype, device=q.device)
        out, new = exact_steps(state, terms, feature_map, q1, k1, v1.unsqueeze(-2), root=root, log_const=log_const)
        return out[..., 0, :].to(out_dtype), new
    feat, a = step_features(feature_map, root, q1, k1)
    # the query's log scale cancels in its output: not computed where feat can skip it
    f_q = (feat(q1, a) if getattr(feat, "width", None) is None else feat(q1, a, log_scale=False)).values[..., 0, :]
    fk = feat(k1, a)
    f_k = fk.values[..., 0, :]
    l_k = (
        fk.log_scale[..., 0] if fk.log_scale is not None else torch.zeros(f_k.shape[:-1], dtype=dtype, device=q.device)
    )
    if state is None:
        state = State.empty(lead, f_k.shape[-1], v1.shape[-1], dtype=dtype, device=q.device)
    else:
        check_state(state, "state", lead, f_k.shape[-1], v1.shape[-1], q.device)
        state = state.to(dtype=dtype)  # as favor.attention's initial_state: sums in the compute dtype
    kv, z, c = state
    new_c = torch.maximum(c, l_k)
    decay, w = _exp_diff(c, new_c), _exp_diff(l_k, new_c)
    f_kw = f_k * w[..., None]
    kv = torch.addcmul(kv * decay[..., None, None], f_kw[..., :, None], v1[..., None, :])
    z = torch.addcmul(f_kw, z, decay[..., None])
    num = (f_q[..., None, :] @ kv)[..., 0, :]
    den = (f_q * z).sum(-1)
    out = num * chunking.inverse(den)[..., None]  # a query with no visible key returns 0
    return out.to(out_dtype), State(kv, z, new_c)


def _exp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(a - b) for b = max(., a): ``normalise.exp_diff``'s values (a = -inf gives 0,
    also when b is -inf, where a - b is NaN) in three ops and without a device sync."""
    return torch.exp(a - b).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


#: favor.attention takes the recurrent path for a continued causal pass (``initial_state``
#: or ``return_state``) of at most this many queries: below it the chunked path's fixed cost
#: (its blocks, autograd function and buffers) is larger than a few token-by-token updates
STEP_MAX_QUERIES = 4


def _safe_inverse(den: torch.Tensor) -> torch.Tensor:
    """1/den, 0 where den == 0 (no visible key), differentiable."""
    empty = den == 0
    return torch.where(empty, torch.zeros_like(den), 1.0 / torch.where(empty, torch.ones_like(den), den))


def steps(
    state: State | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    root: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """``step`` over a few positions at once: q, k (..., L, D), v (..., L, Dv) in the compute
    dtype, not yet scaled (``root`` = sqrt(scale)); ``mask`` (True = padding) broadcasting
    against (..., L) or None -> (out (..., L, Dv), state after position L-1).

    The features of all L rows come from one call; the state is then updated one position
    at a time exactly as ``step`` does (a padded key adds nothing), so this is the arithmetic
    of L calls of ``step`` with the per-call overhead paid once. Differentiable."""
    feat, a = step_features(feature_map, root, q, k)
    f_q = (feat(q, a) if getattr(feat, "width", None) is None else feat(q, a, log_scale=False)).values
    fk = feat(k, a)
    f_k = fk.values
    l_k = fk.log_scale if fk.log_scale is not None else torch.zeros(f_k.shape[:-1], dtype=f_k.dtype, device=f_k.device)
    l_k = l_k.expand(f_k.shape[:-1])
    if mask is not None:
        f_k = f_k.masked_fill(mask[..., None], 0.0)
        l_k = l_k.masked_fill(mask, float("-inf"))
    if state is None:
        lead = torch.broadcast_shapes(f_q.shape[:-2], f_k.shape[:-2], v.shape[:-2])
        state = State.empty(lead, f_k.shape[-1], v.shape[-1], dtype=f_k.dtype, device=f_k.device)
    kv, z, c = state
    # with a graph to keep, the out-of-place forms (the fast ones write into exp's output)
    graph = torch.is_grad_enabled() and any(t.requires_grad for t in (f_q, f_k, v, kv, z))
    exp_diff, inverse = (normalise.exp_diff, _safe_inverse) if graph else (_exp_diff, chunking.inverse)
    outs = []
    for t in range(q.shape[-2]):
        lt, fkt, vt, fqt = l_k[..., t], f_k[..., t, :], v[..., t, :], f_q[..., t, :]
        # the running max is a stabilising shift (it cancels in the outputs): a constant to autograd,
        # as in the chunked path, so that d state.kv / d k is the same on both paths
        new_c = torch.maximum(c, lt).detach()
        decay, w = exp_diff(c, new_c), exp_diff(lt, new_c)
        f_kw = fkt * w[..., None]
        kv = torch.addcmul(kv * decay[..., None, None], f_kw[..., :, None], vt[..., None, :])
        z = torch.addcmul(f_kw, z, decay[..., None])
        c = new_c
        num = (fqt[..., None, :] @ kv)[..., 0, :]
        den = (fqt * z).sum(-1)
        outs.append(num * inverse(den)[..., None])
    out = outs[0][..., None, :] if len(outs) == 1 else torch.stack(outs, -2)
    return out, State(kv, z, c)
