"""FavorAdapter: what one attention layer needs to run FAVOR, as buffers saved in state_dict.

An exact reparametrisation comes first. Softmax attention depends on the logits q.k only,
and two changes leave every attention weight unchanged:

* keys may be shifted by a constant vector c: q.(k - c) = q.k - q.c, a per-query constant,
  and softmax is invariant to adding a constant to a row of logits;
* queries may be mapped by an invertible A and keys by A^-T: (qA).(kA^-T) = q.k.

FAVOR's estimator is not invariant: the relative variance of its estimate of exp(q.k) is
exp(|q + k|^2) - 1 (scaled inputs), so the adapter picks c and A from the layer's query/key
statistics to make that small: c = mean(q) + mean(k) minimises E|q + k - c|^2 (shifting by
the mean key alone can make it larger: in MiniLM mean(q).mean(k) < 0), and A balances the
second moments of queries and keys (``balancing_map``; the cross term q.k is fixed). The
random features then see smaller inputs. Identity when uncalibrated.

Per-sequence shift (``sequence_shift=True``, key_shift "sequence" in performerize): c may as
well depend on the sequence, since every query of a bidirectional layer sees the same keys;
c_s = masked mean of the sequence's queries + of its keys (``sequence_pair_mean``) is the
per-sequence minimiser of sum |q + k - c|^2 (the calibrated constant then only holds the
residual). Causal layers keep the constant alone: c_s would carry future tokens into every
position (``sequence=False``; calibration follows the same rule).

Dense-exponential features (``dense=True``, kernel "derf" in performerize): FAVOR++ uses one
A* per head, A*|w|^2 in the exponent. The dense-exponential random features (DERF) of
Likhosherstov et al. (ICLR 2023) use a matrix, w^T A w; with A diagonal in the eigenbasis of
the pair statistic E[(q + k)(q + k)^T] (scaled, reparametrised inputs) the log-variance
splits over directions and each direction i takes FAVOR++'s closed-form A* for its own
eigenvalue lambda_i: phi(x) ~ exp(sum_i a_i w_i^2 + sum_i b_i w_i x_i - |x|^2/2),
b_i = sqrt(1 - 4 a_i), still unbiased for exp(x.y) and positive. The rotation into the
eigenbasis is orthogonal, so it folds into the query and key maps; the rest is expressed
with the core's FAVOR+ ("positive") features on augmented inputs, so the core's fast paths
run it unchanged: x' = [kappa b*x, a, e] against projection rows [w/kappa, w*w, 0], with
kappa = 1/max(b) <= 1 and e = sqrt(|x|^2 - |kappa b*x|^2) restoring the |x|^2/2 term
(the per-head constant |a|^2/2 cancels in the normaliser).

Legend: H heads, D head dim, M features.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..features.buffer_flags import buffer_derived, buffer_flag
from ..features.feature_map import FeatureMap
from ..features.headwise import HeadwiseFeatureMap
from ..ops.local.block import check_block
from ..ops.local.fused import LeanConstants
from ..ops.local.window import check_exact_set
from ..ops.row_features import LOG2E

log = logging.getLogger(__name__)

__all__ = [
    "FavorAdapter",
    "ATTRIBUTE",
    "adapter_of",
    "default_adapter",
    "repeat_kv",
    "balancing_map",
    "dense_projection",
    "sequence_pair_mean",
]


def balancing_map(sq: torch.Tensor, sk: torch.Tensor, *, ridge: float = 1e-4) -> torch.Tensor:
    """A minimising E|qA|^2 + E|kA^-T|^2 for second-moment matrices sq = E[q^T q], sk = E[k^T k]
    (..., D, D). With P = AA^T the objective is tr(P sq) + tr(P^-1 sk), minimised by the
    geometric mean P = sq^-1/2 (sq^1/2 sk sq^1/2)^1/2 sq^-1/2; A = P^1/2 (symmetric)."""
    d = sq.shape[-1]
    eye = torch.eye(d, dtype=sq.dtype, device=sq.device)

    def reg(s):
        return s + ridge * (torch.diagonal(s, dim1=-2, dim2=-1).mean(-1)[..., None, None] + 1e-12) * eye

    def powm(s, p):
        w, v = torch.linalg.eigh(s)
        return (v * w.clamp_min(1e-30).pow(p)[..., None, :]) @ v.transpose(-1, -2)

    sq, sk = reg(sq), reg(sk)
    rq, irq = powm(sq, 0.5), powm(sq, -0.5)
    p = irq @ powm(rq @ sk @ rq, 0.5) @ irq
    return powm(0.5 * (p + p.transpose(-1, -2)), 0.5)


def dense_projection(w: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """The (M, 2D+1) FAVOR+ projection [w/kappa, w*w, 0] that dense-exponential features use
    (see the module docstring), from an (M, D) Gaussian projection w."""
    return torch.cat([w / kappa, w * w, w.new_zeros(w.shape[0], 1)], dim=-1)


def sequence_pair_mean(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence and head: mean of the queries plus mean of the keys over real tokens,
    (B, H, 1, D), from q (B, H, Lq, D), k (B, H, Lk, D) and ``keep`` bool (B, Lk) (True = real
    token; also applied to the queries when Lq == Lk) or None."""
    if keep is None:
        return q.mean(-2, keepdim=True) + k.mean(-2, keepdim=True)
    if keep.ndim != 2 or keep.shape[0] != k.shape[0] or keep.shape[1] != k.shape[-2]:
        raise ValueError(f"keep must be bool (B={k.shape[0]}, Lk={k.shape[-2]}), got shape {tuple(keep.shape)}")
    w = keep[:, None, :, None].to(k.dtype)
    mk = (k * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1.0)
    if q.shape[-2] != k.shape[-2]:
        return q.mean(-2, keepdim=True) + mk
    return (q * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1.0) + mk


class FavorAdapter(nn.Module):
    """Per-layer FAVOR state: the feature map, a key shift (H, D), and the query map A (H, D, D)
    with the key map A^-T (H, D, D), stored both so the forward pass needs no inverse.

    ``dense=True``: dense-exponential features; ``dense_a`` (H, D) holds a_i per head and
    direction (0: plain FAVOR+) and ``dense_kappa`` the scalar kappa; ``feature_map`` is then
    a "positive" map over 2D+1 inputs with projection ``dense_projection(w, kappa)``.

    ``sequence_shift=True``: keys are also shifted by ``sequence_pair_mean`` of their own
    sequence (bidirectional layers only), before the constant shift."""

    def __init__(
        self,
        feature_map: FeatureMap,
        *,
        heads: int,
        dim: int,
        dense: bool = False,
        sequence_shift: bool = False,
        exact_window: int = -1,
        exact_sinks: int = 0,
        exact_block: int = 1,
    ) -> None:
        super().__init__()
        check_exact_set(exact_window, exact_sinks)
        check_block(exact_block)
        self.feature_map = feature_map
        self.heads, self.dim, self.dense, self.sequence_shift = heads, dim, dense, sequence_shift
        self.exact_window, self.exact_sinks, self.exact_block = exact_window, exact_sinks, exact_block
        eye = torch.eye(dim).expand(heads, dim, dim).clone()
        self.register_buffer("key_shift", torch.zeros(heads, dim))
        self.register_buffer("query_map", eye.clone())
        self.register_buffer("key_map", eye.clone())
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        # exact local terms only: log of a per-head factor on the far keys' estimate (0 until fitted)
        self.register_buffer("far_log_gain", torch.zeros(heads))
        if dense:
            if feature_map.kernel != "positive" or feature_map.dim != 2 * dim + 1:
                raise ValueError(
                    f"dense features need a 'positive' feature map over 2D+1={2 * dim + 1} inputs, "
                    f"got {feature_map.kernel!r} over {feature_map.dim}"
                )
            self.register_buffer("dense_a", torch.zeros(heads, dim, dtype=torch.float64))
            self.register_buffer("dense_kappa", torch.ones((), dtype=torch.float64))

    @property
    def local(self) -> bool:
        """Whether some keys' weights are exact (``exact_window`` >= 0, ``exact_sinks`` > 0 or
        ``exact_block`` > 1; local.py, local_block.py)."""
        return self.exact_window >= 0 or self.exact_sinks > 0 or self.exact_block > 1

    def extra_repr(self) -> str:
        extra = (", dense" if self.dense else "") + (", sequence_shift" if self.sequence_shift else "")
        if self.local:
            extra += f", exact_window={self.exact_window}, exact_sinks={self.exact_sinks}"
            extra += f", exact_block={self.exact_block}" if self.exact_block > 1 else ""
        return f"heads={self.heads}, dim={self.dim}{extra}"

    def log_const(self, dtype: torch.dtype) -> torch.Tensor | float:
        """The ``log_const`` of favor.ops.local: log E[phi(q).phi(k)] - q.k, that is 0, or for
        dense features the per-head constant -|a|^2 - sum_i log(1 - 4 a_i) / 2, minus
        ``far_log_gain`` (so exp(far_log_gain) weighs the far keys' estimate against the
        exact terms; 0 unless fitted, and with no far keys it changes nothing); (H, 1, 1) or 0."""
        gain = self.far_log_gain
        if not self.dense:
            if not gain.requires_grad and not buffer_flag(self, "far_log_gain", gain, lambda g: (g != 0).any()):
                return 0.0  # the plain float keeps the cheaper scalar path
            return -gain.to(dtype)[:, None, None]

        def compute():
            a = self.dense_a.double()
            c = -(a * a).sum(-1) - 0.5 * torch.log1p(-4.0 * a).sum(-1)
            return c.to(dtype)[:, None, None] - gain.to(dtype)[:, None, None]

        return buffer_derived(self, f"log_const {dtype}", (self.dense_a, gain), compute)

    def logit_inputs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        scaling: float | None,
        *,
        keep: torch.Tensor | None = None,
        sequence: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q*, k*) whose dot products are the logits that the features of ``inputs`` estimate
        (up to ``log_const``): the reparametrised q and k times sqrt(scaling)."""
        return self.inputs_and_logits(q, k, scaling, keep=keep, sequence=sequence)[3:]

    def inputs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        scaling: float | None,
        *,
        keep: torch.Tensor | None = None,
        sequence: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """(q', k', scale) to hand to ``favor.attention`` with ``self.feature_map``: the
        reparametrised q and k with the layer's scaling, or, for dense features, the augmented,
        already scaled inputs with scale 1. ``keep`` (B, Lk) bool: real keys; ``sequence``: apply
        the sequence shift (if the adapter has one; False for causal attention)."""
        return self.inputs_and_logits(q, k, scaling, keep=keep, sequence=sequence)[:3]

    def inputs_and_logits(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        scaling: float | None,
        *,
        keep: torch.Tensor | None = None,
        sequence: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, float | None, torch.Tensor, torch.Tensor]:
        """``inputs`` and ``logit_inputs`` from one reparametrisation: (q', k', scale, q*, k*).

        q* and k* are q and the shifted k, not the mapped pair: q A . (k - c) A^-T is the same
        logit only while the key map stays A^-T, and fitting or distilling trains the two maps
        as separate tensors. The exact terms must stay softmax's own weights whatever the maps
        (they only reparametrise FAVOR's estimate), so the logits never pass through them."""
        qs, ks = self.shifted(q, k, keep=keep, sequence=sequence)
        qa, kb = self._mapped(qs, ks) if self._calibrated() else (qs, ks)
        root = (self.dim**-0.5 if scaling is None else scaling) ** 0.5
        dt = torch.float64 if qa.dtype == torch.float64 else torch.float32
        qx, kx = qs.to(dt) * root, ks.to(dt) * root
        if not self.dense:
            return qa, kb, scaling, qx, kx
        return (*self._augment(qa * root, kb * root), 1.0, qx, kx)  # in qa's dtype, as before

    def step_inputs(
        self, q: torch.Tensor, k: torch.Tensor, scaling: float | None
    ) -> tuple[torch.Tensor, torch.Tensor, float | None, torch.Tensor, torch.Tensor]:
        """``inputs_and_logits(q, k, scaling, sequence=False)`` for one decoding token, q and k
        (B, H, 1, D): the same numbers with both rows scaled (and augmented) as one tensor,
        a few ops fewer per layer and token."""
        if q.shape[-2] != 1 or k.shape != q.shape:
            return self.inputs_and_logits(q, k, scaling, sequence=False)
        qs, ks = self.shifted(q, k, sequence=False)
        dt = torch.float64 if qs.dtype == torch.float64 else torch.float32
        if qs.dtype != dt:  # half inputs: augmented in their own dtype (inputs_and_logits)
            return self.inputs_and_logits(q, k, scaling, sequence=False)
        root = (self.dim**-0.5 if scaling is None else scaling) ** 0.5
        logits = torch.cat([qs, ks], -2).mul_(root)  # never through the maps (inputs_and_logits)
        qx, kx = logits.narrow(-2, 0, 1), logits.narrow(-2, 1, 1)
        if self._calibrated():
            qa, kb = self._mapped(qs, ks)
            x = torch.cat([qa, kb], -2).mul_(root) if self.dense else None
        else:
            qa, kb, x = qs, ks, logits
        if not self.dense:
            return qa, kb, scaling, qx, kx
        both = self._augment_rows(x)
        return both.narrow(-2, 0, 1), both.narrow(-2, 1, 1), 1.0, qx, kx

    def lean_constants(
        self, scaling: float | None, dtype: torch.dtype, device, *, graph_free: bool = False
    ) -> LeanConstants | None:
        """The constants of the fused decoding step (favor.ops.local.fused) for this layer's
        reparametrisation and features, or None where it does not apply (features other than
        FAVOR+ with the exact stabiliser, a projection per head). Made in float64 from the
        buffers once per version of them (``buffer_derived``): the same numbers as
        ``inputs_and_logits`` and ``log_const``, folded into per-head matrices."""
        # called per layer and token: the buffers straight from the modules' dicts (not
        # nn.Module.__getattr__)
        mine, fm = self._buffers, self._modules["feature_map"]
        theirs = fm._buffers
        if fm.kernel != "positive" or fm.stabilizer != "exact" or theirs["projection"].ndim != 2:
            return None
        buffers = (
            theirs["projection"],
            mine["key_shift"],
            mine["query_map"],
            mine["key_map"],
            mine["calibrated"],
            mine["far_log_gain"],
        )
        if self.dense:
            buffers += (mine["dense_a"], mine["dense_kappa"])

        def compute():
            h, d = self.heads, self.dim
            f64 = dict(dtype=torch.float64, device=device)
            root = (d**-0.5 if scaling is None else scaling) ** 0.5
            p = fm.projection.to(**f64)
            log_m = 0.5 * math.log(p.shape[0])
            lc = -self.far_log_gain.to(**f64)
            if self.dense:
                a = self.dense_a.to(**f64)
                gain = torch.sqrt(1.0 - 4.0 * a) * self.dense_kappa.to(**f64)  # kappa b, as _dense_constants
                a2 = (a * a).sum(-1)
                lc = lc - a2 - 0.5 * torch.log1p(-4.0 * a).sum(-1)  # log_const
                bias_s = (a @ p[:, d : 2 * d].T) * LOG2E  # the a block of [kappa b x, a, e] against w*w
                proj = p[:, :d]
            else:  # features of x' root with the layer's scale: x = x' root, gain 1
                gain, bias_s, a2, proj = None, None, torch.zeros(h, **f64), p
            # the e column of [kappa b x, a, e]: zero as dense_projection makes it, trained by
            # distillation (then each row's e = sqrt(|x|^2 - |kappa b x|^2) weighs it)
            proj_e = p[:, 2 * d] * LOG2E if self.dense else None
            if proj_e is not None and not bool(proj_e.any()):  # host sync: once per version
                proj_e = None
            rest = None
            if gain is not None and bool((gain == 1).all()):  # host sync: once per version
                gain = None
                if proj_e is not None:  # e = sqrt(1e-20), the adapter's clamp, for every row
                    bias_s = bias_s + 1e-10 * proj_e
                    proj_e = None
            if proj_e is not None:
                rest = torch.sqrt((1.0 - gain * gain).clamp_min(0.0))
            if bias_s is not None and not bool(bias_s.any()):  # host sync: once per version
                bias_s = None
            cq = LOG2E * (lc + 0.5 * a2 + log_m)
            ck = -0.5 * a2 - log_m
            mq = bq = mk = bk = None
            if self._calibrated():
                c = self.key_shift.to(**f64)
                qa, kb = self.query_map.to(**f64) * root, self.key_map.to(**f64) * root
                mq = torch.cat([qa, (-LOG2E * root * root) * c[:, :, None]], -1)
                bq = torch.cat([torch.zeros(h, 1, d, **f64), cq[:, None, None]], -1)
                mk = torch.cat([kb, torch.zeros(h, d, 1, **f64)], -1)
                bk = torch.cat([-(c[:, None, :] @ kb), ck[:, None, None]], -1)

            def cast(t):
                return None if t is None else t.to(dtype).contiguous()

            return LeanConstants(
                cast(mq),
                cast(bq),
                cast(mk),
                cast(bk),
                cast(gain),
                cast(proj.T * LOG2E),
                cast(bias_s),
                cast(cq),
                cast(ck),
                root,
                cast(proj_e),
                cast(rest),
            )

        # a tuple: no formatting per call; ``graph_free``: grad and inference mode checked off
        return buffer_derived(self, ("lean", scaling, dtype, device), buffers, compute, graph_free=graph_free)

    def _augment(self, qx: torch.Tensor, kx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense features' inputs [b x, a, e] of scaled, reparametrised q and k (module docstring)."""
        if qx.shape[-2] == kx.shape[-2] and qx.shape[:-2] == kx.shape[:-2]:  # e.g. a decoding step
            both = self._augment_rows(torch.cat([qx, kx], -2))  # both rows in one pass
            n = qx.shape[-2]
            return both.narrow(-2, 0, n), both.narrow(-2, n, n)
        return self._augment_rows(qx), self._augment_rows(kx)

    def _augment_rows(self, x: torch.Tensor) -> torch.Tensor:
        a, b, rest = self._dense_constants(x.dtype)
        e = (x * x * rest).sum(-1, keepdim=True).clamp_min(1e-20).sqrt()  # |x|^2 - |b x|^2 >= 0 as kappa b <= 1
        return torch.cat([x * b, a.expand(x.shape[:-1] + (self.dim,)), e], dim=-1)

    def _dense_constants(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """a (H, 1, D), kappa b (H, 1, D) and 1 - (kappa b)^2 (H, 1, D) in ``dtype``."""

        def compute():
            a = self.dense_a.to(dtype)
            b = torch.sqrt(1.0 - 4.0 * a) * self.dense_kappa.to(dtype)  # kappa b <= 1
            return a[:, None, :], b[:, None, :], (1.0 - b * b)[:, None, :]

        return buffer_derived(self, f"dense {dtype}", (self.dense_a, self.dense_kappa), compute)

    @torch.no_grad()
    def set_dense(self, a: torch.Tensor) -> None:
        """Install a_i (H, D) (each <= 0) and rewrite the projection for kappa = 1/max b."""
        if not self.dense:
            raise ValueError("set_dense needs an adapter built with dense=True")
        # host sync: setting the dense parameters, once per fit
        if tuple(a.shape) != (self.heads, self.dim) or bool((a > 0).any()):
            raise ValueError(f"a must be (H={self.heads}, D={self.dim}) and <= 0, got {tuple(a.shape)}")
        w = self.feature_map.projection[:, : self.dim].double() * self.dense_kappa  # the Gaussian rows
        kappa = float(torch.sqrt(1.0 - 4.0 * a.double()).max()) ** -1  # host sync: once per fit
        self.dense_a.copy_(a)
        self.dense_kappa.fill_(kappa)
        self.feature_map.projection.copy_(dense_projection(w, kappa).to(self.feature_map.projection.dtype))

    def transform(
        self, q: torch.Tensor, k: torch.Tensor, *, keep: torch.Tensor | None = None, sequence: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, L, D) -> (qA, (k - c)A^-T), in float32 (float64 for float64 inputs); the
        logits q.k change by a per-query constant only (c includes the sequence's pair mean
        when ``sequence_shift`` and ``sequence``; ``keep`` (B, Lk) bool marks real keys)."""
        if not self._calibrated():
            return q, k
        return self._mapped(*self.shifted(q, k, keep=keep, sequence=sequence))

    def shifted(
        self, q: torch.Tensor, k: torch.Tensor, *, keep: torch.Tensor | None = None, sequence: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k - c) in float32 (float64 for float64 inputs), before the maps: the same
        logits as q.k up to a per-query constant (c as in ``transform``); q, k as given
        until calibrated."""
        if not self._calibrated():
            return q, k
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k = q.to(dt), k.to(dt)
        if self.sequence_shift and sequence:
            k = k - sequence_pair_mean(q, k, keep)
        return q, k - self.key_shift.to(dt)[:, None, :]

    def _calibrated(self) -> bool:
        return buffer_flag(self, "calibrated", self.calibrated, lambda c: c)

    def _mapped(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q @ self.query_map.to(q.dtype), k @ self.key_map.to(k.dtype)

    @torch.no_grad()
    def set_reparametrisation(self, key_shift: torch.Tensor, query_map: torch.Tensor) -> None:
        """Install c (H, D) and A (H, D, D); A^-T is computed here in float64."""
        self.key_shift.copy_(key_shift)
        self.query_map.copy_(query_map)
        self.key_map.copy_(torch.linalg.inv(query_map.double()).transpose(-1, -2).to(self.key_map.dtype))
        self.calibrated.fill_(True)


#: the attribute of an attention module that holds its FavorAdapter
ATTRIBUTE = "favor"


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, heads, L, D): grouped-query attention's key/value heads, each
    repeated for its group of query heads."""
    b, hkv, length, d = x.shape
    if hkv == heads:
        return x
    if heads % hkv:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({hkv})")
    return x[:, :, None].expand(b, hkv, heads // hkv, length, d).reshape(b, heads, length, d)


def default_adapter(module: torch.nn.Module, heads: int, dim: int, device) -> FavorAdapter:
    """What a model loaded with attn_implementation="favor" but never performerized gets on its
    first call: FAVOR++ with M=256, projection seeded by the layer index, no calibration."""
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise RuntimeError(
            f"{type(module).__name__} runs attn_implementation='favor' without a FavorAdapter and has no "
            "layer_idx to seed one; call favor.hf.performerize(model) first"
        )
    log.warning(
        "%s (layer %d) has no FavorAdapter: using uncalibrated FAVOR++ with M=256; "
        "favor.hf.performerize(model, calibration=...) is far more accurate",
        type(module).__name__,
        layer,
    )
    g = torch.Generator().manual_seed(layer)  # as performerize(seed=0) draws layer i's projection
    fm = HeadwiseFeatureMap("oprf", heads=heads, dim=dim, num_features=256, generator=g)
    adapter = FavorAdapter(fm, heads=heads, dim=dim).to(device)
    module.add_module(ATTRIBUTE, adapter)
    return adapter


def adapter_of(module: torch.nn.Module, heads: int | None = None, dim: int | None = None, device=None) -> FavorAdapter:
    adapter = getattr(module, ATTRIBUTE, None)
    if isinstance(adapter, FavorAdapter):
        return adapter
    if heads is None:
        raise RuntimeError(
            f"{type(module).__name__} has no FavorAdapter; call favor.hf.performerize(model) "
            "(or load with favor.hf.from_pretrained) first"
        )
    return default_adapter(module, heads, dim, device)
