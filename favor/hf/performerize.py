"""performerize: switch a loaded transformers model to FAVOR attention in place.

Each attention module gets a FavorAdapter (``module.favor``): a per-layer feature map with
its own projection (seeded by (seed, layer)), and, when calibration inputs are given, an
exact reparametrisation of queries and keys plus FAVOR++'s rho per head, all computed from
the softmax model's own queries and keys on those inputs (see adapter.py).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType

import torch
from torch import nn

from ..features.feature_map import KERNELS, FeatureMap
from ..features.headwise import HeadwiseFeatureMap
from ..features.maps import oprf_a
from ..features.projections import NORMS, PROJECTIONS
from ..ops.local.block import check_block
from ..ops.local.window import check_exact_set
from .adapter import ATTRIBUTE, FavorAdapter, balancing_map, dense_projection, sequence_pair_mean
from .generation import use_favor_cache
from .masks import plan_from_mask
from .refusals import UnsupportedAttentionError, check_config, watching_cross_attention
from .registry import NAME, probing, register
from .tie import key_groups

__all__ = [
    "PerformerConfig",
    "performerize",
    "attach_adapters",
    "attention_modules",
    "probe_inputs",
    "feature_defaults",
    "DEFAULTS",
    "PLAIN",
    "CONFIG_KEY",
]

log = logging.getLogger(__name__)

#: the key shift c: none; "keys": the mean key; "pair": the mean key plus the mean query, which
#: minimises E|q + k - c|^2, the (log) variance of FAVOR's estimate of exp(q.k) (scaled);
#: "sequence": each sequence's own pair mean at run time, plus the calibrated pair mean of what
#: remains (bidirectional layers; causal layers keep "pair": a sequence mean sees the future)
KEY_SHIFTS = ("none", "keys", "pair", "sequence")

#: favor.hf's own kernel: dense-exponential random features (see adapter.py), run as FAVOR+
DENSE = "derf"

#: performerize's defaults, the `favor performerize` / `favor distill` defaults too
#: (commands/_hf.py): dense-exponential features calibrated on the given inputs, the
#: per-sequence key shift, and exact weights for each query's block of 32 positions widened
#: by 8 either side and for the first token, FAVOR for the rest: the most faithful linear-cost
#: setting measured on MiniLM (distilled: 0.992 / 0.992 embedding cosine at 128 / 512 tokens,
#: the window alone 0.984 / 0.990; blocks of 64 give 0.994 / 0.993 but cost 2.15x plain FAVOR's
#: forward at L=4096, 32 1.91x: benchmarks/results/hf_fidelity_512.md). Blocks were measured
#: on encoders: a model with causal layers gets exact_block=1 unless one is given.
DEFAULTS = MappingProxyType(
    {"kernel": DENSE, "key_shift": "sequence", "exact_window": 8, "exact_sinks": 1, "exact_block": 32}
)
#: ``plain=True`` (``--plain``): the paper's estimator, FAVOR alone with the calibrated constant
#: key shift and no exact terms (kernel="positive": FAVOR+; "oprf": FAVOR++)
PLAIN = MappingProxyType({"key_shift": "pair", "exact_window": -1, "exact_sinks": 0, "exact_block": 1})


def feature_defaults(*, plain: bool = False, causal: bool = False, **given) -> dict:
    """performerize's options ``kernel``, ``key_shift``, ``exact_window``, ``exact_sinks``,
    ``exact_block``: each given one that is not None, else ``PLAIN``'s (``plain``), else
    ``DEFAULTS``'; ``causal`` (a model with causal layers): exact_block 1 unless given."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"feature_defaults() got unexpected options {unknown}; expected {sorted(DEFAULTS)}")
    base = {**DEFAULTS, **PLAIN} if plain else dict(DEFAULTS)
    if causal:
        base["exact_block"] = 1  # a causal block would show its later keys to its earlier queries
    return {k: given[k] if given.get(k) is not None else v for k, v in base.items()}


#: where performerize records its PerformerConfig on ``model.config`` (saved in config.json)
CONFIG_KEY = "favor_performer"


@dataclass(frozen=True)
class PerformerConfig:
    """What performerize did, enough to rebuild the adapters' shapes for loading."""

    kernel: str = "oprf"
    num_features: int = 256
    projection: str = "orthogonal"
    norm: str = "chi"
    seed: int = 0
    key_shift: str = "pair"
    balance: bool = True
    calibrate_rho: bool = True
    exact_window: int = -1
    exact_sinks: int = 0
    exact_block: int = 1
    #: calibrate the key side (shift, maps, dense a) once per key/value group of a GQA layer
    #: (favor.hf.tie): decoding then keeps the far state once per key/value head
    tie_keys: bool = False

    def __post_init__(self) -> None:
        check_exact_set(self.exact_window, self.exact_sinks)
        check_block(self.exact_block)
        if self.kernel != DENSE and (self.kernel not in KERNELS or not KERNELS[self.kernel][0]):
            ok = sorted([DENSE] + [k for k, v in KERNELS.items() if v[0]])
            raise ValueError(f"kernel must be one of {ok} (random-feature kernels), got {self.kernel!r}")
        if isinstance(self.num_features, bool) or not isinstance(self.num_features, int) or self.num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {self.num_features!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {sorted(PROJECTIONS)}, got {self.projection!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.key_shift not in KEY_SHIFTS:
            raise ValueError(f"key_shift must be one of {KEY_SHIFTS}, got {self.key_shift!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")


class _Stats:
    """Running first and second moments of queries and keys per head, in float64."""

    def __init__(self) -> None:
        self.n_q = self.n_k = 0.0
        self.sum_q = self.sum_k = self.sq_q = self.sq_k = None
        self.heads = self.dim = None
        self.scaling = None
        self.cross = False  # cross-attention: keys from another sequence (refusals.watching_cross_attention)
        self.causal = False  # a causal mask (decoder self-attention)

    @staticmethod
    def _acc(x: torch.Tensor, keep: torch.Tensor | None):
        # x (B, H, L, D); keep (B, L) bool or None -> count, (H, D), (H, D, D)
        x = x.double()
        if keep is not None:
            x = x * keep[:, None, :, None].to(x.dtype)
            n = float(keep.sum()) if keep.ndim == 2 else float(keep.numel())
        else:
            n = float(x.shape[0] * x.shape[2])
        return n, x.sum((0, 2)), torch.einsum("bhld,bhle->hde", x, x)

    def add(self, q, k, q_keep, k_keep, scaling) -> None:
        nq, sq, qq = self._acc(q, q_keep)
        nk, sk, kk = self._acc(k, k_keep)
        if self.sum_q is None:
            self.heads, self.dim = q.shape[1], q.shape[-1]
            self.sum_q, self.sq_q, self.sum_k, self.sq_k = sq, qq, sk, kk
        else:
            self.sum_q, self.sq_q, self.sum_k, self.sq_k = (
                self.sum_q + sq,
                self.sq_q + qq,
                self.sum_k + sk,
                self.sq_k + kk,
            )
        self.n_q += nq
        self.n_k += nk
        self.scaling = scaling


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A small batch of the model's main input (``model.main_input_name``), for the probe
    that finds the attention modules when no calibration inputs are given: token ids (the
    model's dummy inputs), random images of ``config.image_size`` (pixel_values) or one
    second of random 16 kHz audio (input_values). Another input is a ValueError asking for
    ``calibration``."""
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        return dict(model.dummy_inputs)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else None
    g = torch.Generator().manual_seed(0)
    size = getattr(model.config, "image_size", None)
    if name == "pixel_values" and size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (1, getattr(model.config, "num_channels", 3), h, w)
    elif name == "input_values":
        shape = (1, 16_000)
    else:
        raise ValueError(
            f"{type(model).__name__} takes {name!r} (model.main_input_name), for which performerize cannot make up a "
            f"probe input: pass calibration=[{{{name!r}: ...}}], a batch the model accepts"
        )
    return {name: torch.randn(shape, generator=g, dtype=dtype).to(device)}


def attention_modules(
    model: nn.Module, inputs: Iterable[Mapping[str, torch.Tensor]] | None = None, *, sequence_shift: bool = False
):
    """Run the model (softmax attention) on ``inputs`` (default: ``probe_inputs``) and return the
    attention modules in call order as [(qualified name, module, _Stats)]. ``sequence_shift``:
    the key statistics are of keys minus their sequence's pair mean (``sequence_pair_mean``)."""
    register()
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[int, tuple[str, nn.Module, _Stats]] = {}

    def record(module, query, key, value, attention_mask, scaling, is_causal):
        b, h, lq, d = query.shape
        lk = key.shape[-2]
        causal_module = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
        plan = plan_from_mask(attention_mask, batch=b, q_length=lq, kv_length=lk, is_causal=causal_module)
        if h % key.shape[1]:
            raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({key.shape[1]})")
        k = key.repeat_interleave(h // key.shape[1], dim=1) if key.shape[1] != h else key
        cross = is_cross(module)
        k_keep = None if plan.key_padding_mask is None else ~plan.key_padding_mask.expand(b, lk)
        q_keep = k_keep if (k_keep is not None and lq == lk and not cross) else None
        if sequence_shift and not plan.causal and not cross:  # as favor_attention_forward: causal and
            # cross-attention layers keep the constant
            k = k - sequence_pair_mean(query.double(), k.double(), k_keep)
        entry = found.setdefault(id(module), (names.get(id(module), f"<{type(module).__name__}>"), module, _Stats()))
        entry[2].add(query, k, q_keep, k_keep, scaling if scaling is not None else d**-0.5)
        entry[2].cross = entry[2].cross or cross
        entry[2].causal = entry[2].causal or plan.causal

    batches = list(inputs) if inputs is not None else [probe_inputs(model)]
    with watching_cross_attention(model) as is_cross, probing(model, record), torch.no_grad():
        for batch in batches:
            try:
                model(**batch)
            except UnsupportedAttentionError as e:  # a keyword of one call (support.check_keywords)
                raise UnsupportedAttentionError(f"{type(model).__name__} cannot be performerized: {e}") from None
    if not found:
        raise UnsupportedAttentionError(
            f"{type(model).__name__} made no calls through transformers' AttentionInterface (its attention "
            "is hard-coded in the model, not dispatched by attn_implementation), so FAVOR cannot replace it"
        )
    return list(found.values())


def attach_adapters(model: nn.Module, config: PerformerConfig, layers) -> list[FavorAdapter]:
    """Give every attention module a fresh FavorAdapter (identity reparametrisation).

    ``layers``: [(module, heads, head dim)] in layer order; layer i's projection is drawn
    from seed * 1_000_003 + i."""
    adapters = []
    for layer, (module, heads, dim) in enumerate(layers):
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + layer)
        if config.kernel == DENSE:
            w = PROJECTIONS[config.projection](config.num_features, dim, norm=config.norm, generator=g)
            fm = FeatureMap("positive", projection=dense_projection(w))
        else:
            fm = HeadwiseFeatureMap(
                config.kernel,
                heads=heads,
                dim=dim,
                num_features=config.num_features,
                projection=config.projection,
                norm=config.norm,
                generator=g,
            )
        adapter = FavorAdapter(
            fm,
            heads=heads,
            dim=dim,
            dense=config.kernel == DENSE,
            sequence_shift=config.key_shift == "sequence",
            exact_window=config.exact_window,
            exact_sinks=config.exact_sinks,
            exact_block=config.exact_block,
        )
        p = next(module.parameters(), None)
        if p is not None:
            adapter.to(p.device)
        module.add_module(ATTRIBUTE, adapter)
        adapters.append(adapter)
    return adapters


def _pooled(stats: _Stats, groups: int) -> _Stats:
    """The statistics of each group of ``groups`` heads pooled (every head of a group gets
    the group's sums and counts times ``groups``: the same means), so that calibration gives
    the group's heads one key shift, map and dense a (``tie_keys``; favor.hf.tie)."""
    out = copy.copy(stats)

    def pool(t):
        g = t.reshape(t.shape[0] // groups, groups, *t.shape[1:]).sum(1)
        return g.repeat_interleave(groups, 0)

    out.sum_q, out.sq_q, out.sum_k, out.sq_k = (pool(t) for t in (stats.sum_q, stats.sq_q, stats.sum_k, stats.sq_k))
    out.n_q, out.n_k = stats.n_q * groups, stats.n_k * groups
    return out


@torch.no_grad()
def _calibrate(adapter: FavorAdapter, stats: _Stats, config: PerformerConfig) -> None:
    h, d = stats.heads, stats.dim
    mean_q = stats.sum_q / stats.n_q  # (H, D)
    mean_k = stats.sum_k / stats.n_k
    sq = stats.sq_q / stats.n_q  # E[q^T q] (H, D, D)
    sk = stats.sq_k / stats.n_k
    shift = {"none": torch.zeros_like(mean_k), "keys": mean_k, "pair": mean_k + mean_q, "sequence": mean_k + mean_q}[
        config.key_shift
    ]
    # second moment of the shifted keys: E[(k-c)^T (k-c)] = E[k^T k] - c^T m - m^T c + c^T c
    sk_c = sk - shift[:, :, None] * mean_k[:, None, :] - mean_k[:, :, None] * shift[:, None, :]
    sk_c = sk_c + shift[:, :, None] * shift[:, None, :]
    a = balancing_map(sq, sk_c) if config.balance else torch.eye(d, dtype=torch.float64).expand(h, d, d).clone()
    if config.kernel == DENSE:
        _calibrate_dense(adapter, stats, shift, a, sq, sk_c)
        return
    adapter.set_reparametrisation(shift.to(adapter.key_shift.dtype), a.to(adapter.query_map.dtype))
    if config.kernel == "oprf" and config.calibrate_rho:
        # rho = mean over pairs of |q' + k'|^2 / D with q', k' the scaled, reparametrised inputs
        s = stats.scaling
        a = a.double()
        b = torch.linalg.inv(a).transpose(-1, -2)
        eq2 = torch.einsum("hde,hdf,hfe->h", a, sq, a) * s  # E|q A|^2 * scale
        ek2 = torch.einsum("hde,hdf,hfe->h", b, sk_c, b) * s
        mq = torch.einsum("hd,hde->he", mean_q, a)
        mk = torch.einsum("hd,hde->he", mean_k - shift, b)
        rho = (eq2 + ek2 + 2.0 * s * (mq * mk).sum(-1)) / d
        adapter.feature_map.set_head_rho(rho)


@torch.no_grad()
def _calibrate_dense(adapter: FavorAdapter, stats: _Stats, shift, a, sq, sk_c) -> None:
    """Dense-exponential features: rotate the reparametrised inputs into the eigenbasis of the
    pair statistic S = E[(q' + k')(q' + k')^T] (scaled; q', k' from independent tokens) and
    give direction i FAVOR++'s A* for its eigenvalue."""
    s = stats.scaling
    a = a.double()
    b = torch.linalg.inv(a).transpose(-1, -2)
    mq = torch.einsum("hd,hde->he", stats.sum_q / stats.n_q, a) * s**0.5
    mk = torch.einsum("hd,hde->he", stats.sum_k / stats.n_k - shift, b) * s**0.5
    pair = (a.transpose(-1, -2) @ sq @ a + b.transpose(-1, -2) @ sk_c @ b) * s
    pair = pair + mq[:, :, None] * mk[:, None, :] + mk[:, :, None] * mq[:, None, :]
    lam, rot = torch.linalg.eigh(pair)  # (H, D), (H, D, D) orthogonal: q.k is unchanged
    adapter.set_reparametrisation(shift.to(adapter.key_shift.dtype), (a @ rot).to(adapter.query_map.dtype))
    adapter.set_dense(oprf_a(lam.clamp_min(0.0)))


def performerize(
    model: nn.Module,
    *,
    kernel: str | None = None,
    num_features: int = 256,
    seed: int = 0,
    projection: str = "orthogonal",
    norm: str = "chi",
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    key_shift: str | None = None,
    balance: bool = True,
    calibrate_rho: bool = True,
    exact_window: int | None = None,
    exact_sinks: int | None = None,
    exact_block: int | None = None,
    plain: bool = False,
    tie_keys: bool = False,
) -> nn.Module:
    """Switch ``model`` (a transformers PreTrainedModel) to FAVOR attention in place; returns it.

    Defaults (``DEFAULTS``, the CLI's too): ``kernel="derf"``, ``key_shift="sequence"``,
    ``exact_window=8, exact_sinks=1, exact_block=32`` (``exact_block=1`` for a model with causal
    layers). ``plain=True``: the paper's estimator, no exact terms and the constant "pair" key
    shift (``PLAIN``; with ``kernel="positive"``: FAVOR+, ``"oprf"``: FAVOR++). An option given
    explicitly wins over both.

    ``calibration``: batches (dicts of model inputs, e.g. a tokenizer's output) on which the
    softmax model's queries and keys are measured to fit, per layer and head, the key shift,
    the query/key balancing map and FAVOR++'s rho (``key_shift``, ``balance``,
    ``calibrate_rho`` switch them; ``key_shift="sequence"`` also shifts each sequence's keys by
    its own pair mean at run time in bidirectional layers). ``exact_window`` >= 0 and
    ``exact_sinks`` > 0 compute the weights of each query's keys within ``exact_window``
    positions and of the first ``exact_sinks`` tokens exactly, FAVOR the rest (local.py;
    in a causal layer the
    neighbours before the query; still linear in length). ``exact_block`` = C > 1 (bidirectional
    layers only) makes the exact set each query's whole block of C positions widened by
    ``exact_window`` either side (local_block.py). ``kernel="derf"``: dense-exponential features, a matrix A
    per head in place of FAVOR++'s scalar, fitted on ``calibration`` (adapter.py). Without it the adapters are the identity and rho comes
    from each input sequence. Projections are drawn from (``seed``, layer index) and saved in
    ``model.state_dict()``; the config goes to ``model.config.favor_performer``. A decoder's
    ``model.generate`` then keeps a constant-size ``favor.hf.FavorCache`` (cache.py).
    """
    given = dict(
        kernel=kernel, key_shift=key_shift, exact_window=exact_window, exact_sinks=exact_sinks, exact_block=exact_block
    )
    config = PerformerConfig(
        num_features=num_features,
        projection=projection,
        norm=norm,
        seed=seed,
        balance=balance,
        calibrate_rho=calibrate_rho,
        tie_keys=tie_keys,
        **feature_defaults(plain=plain, **given),
    )
    calibrated = calibration is not None
    check_config(model)  # features FAVOR does not implement; the probe below checks each call's keywords
    modules = attention_modules(model, calibration, sequence_shift=config.key_shift == "sequence")
    if any(st.causal for _, _, st in modules):  # the default blocks are bidirectional (local_block.py)
        config = replace(config, **feature_defaults(plain=plain, causal=True, **given))
    adapters = attach_adapters(model, config, [(m, st.heads, st.dim) for _, m, st in modules])
    for adapter, (_, _, stats) in zip(adapters, modules, strict=True):
        adapter.cross_attention = stats.cross  # exact local terms need self-attention: plain FAVOR here
    if calibrated:
        for adapter, (_, module, stats) in zip(adapters, modules, strict=True):
            groups = key_groups(module) if config.tie_keys else 1
            _calibrate(adapter, stats if groups == 1 else _pooled(stats, groups), config)
    setattr(
        model.config,
        CONFIG_KEY,
        {
            **asdict(config),
            "calibrated": calibrated,
            "modules": [n for n, _, _ in modules],
            "cross_attention": [n for n, _, st in modules if st.cross],
        },
    )
    model.set_attn_implementation(NAME)
    use_favor_cache(model)  # model.generate keeps a constant-size FavorCache (cache.py)
    log.info("performerized %d attention modules (%s, M=%d)", len(adapters), config.kernel, num_features)
    return model
