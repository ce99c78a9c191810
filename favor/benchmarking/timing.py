"""Timing and peak-memory measurements of favor against exact attention (and peers).

Used by ``favor bench``, ``favor demo`` (``speed_table``) and the scripts in benchmarks/.
Library code: nothing is printed; results are lists of dicts.

Method: every contender is checked against its reference before it is timed (a failing
check is recorded and the contender is not timed); warm-up, then the median of ``repeats``
runs, contenders interleaved round by round so that a busy machine slows them alike; peak
memory is ``ru_maxrss`` of a fresh process (forked from a clean server that has imported
torch and favor) after the run, minus its value once the inputs exist (after one tiny
warm-up call, so that library workspaces are not counted).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import multiprocessing
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import favor

from ..ops.local.reference import exact_terms_reference

__all__ = [
    "BenchConfig",
    "bench_inputs",
    "bench_feature_map",
    "CONTENDERS",
    "machine_info",
    "matmul_gflops",
    "matmul_fraction",
    "check_contender",
    "time_contenders",
    "peak_memory_mib",
    "speed_table",
    "decode_latency",
    "decode_flatness",
    "flops",
    "sync",
    "run_once",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    batch: int = 1
    heads: int = 8
    dim: int = 64
    num_features: int = 256
    kernel: str = "positive"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    #: where inputs, feature maps and caches live ("cpu", "cuda", "cuda:1"); on a GPU every
    #: timed call is bracketed by torch.cuda.synchronize and peak memory is the allocator's
    device: str = "cpu"


def sync(device) -> None:
    """Wait for the device's queued kernels (a GPU call returns before its work is done)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# -- machine ------------------------------------------------------------------------------
def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "favor": favor.__version__,
        "python": platform.python_version(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        # favor's per-chunk ops are small: idle OpenMP threads that spin (the default) make
        # them fast on a quiet machine, and slow when a neighbour holds the other core
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "cuda": torch.version.cuda,
    }


def matmul_gflops(n: int = 2048, repeats: int = 5, *, device: str = "cpu") -> float:
    """float32 GEMM throughput measured now (the machine's practical peak)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def matmul_fraction(length: int, cfg: BenchConfig, *, repeats: int = 7, n: int = 2048) -> dict:
    """favor's bidirectional forward in GFLOP/s (``flops``) against an n x n float32 GEMM,
    the two timed alternately round by round (1 warm-up, medians), so that both see the
    same machine state; on a 2-core CPU the GEMM rate alone moved by 25 % between two
    measurements a minute apart."""
    fm = bench_feature_map(cfg)
    q, k, v = bench_inputs(length, cfg, grad=False)
    a, b = torch.randn(n, n, device=cfg.device), torch.randn(n, n, device=cfg.device)
    runs = {"favor": lambda: favor.attention(q, k, v, fm), "matmul": lambda: a @ b}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for f in runs.values():
            f()
        for _ in range(repeats):
            for name, f in runs.items():
                sync(cfg.device)
                t0 = time.perf_counter()
                f()
                sync(cfg.device)
                times[name].append(time.perf_counter() - t0)
    fav = flops("favor", length, cfg) / statistics.median(times["favor"]) / 1e9
    mm = 2 * n**3 / statistics.median(times["matmul"]) / 1e9
    return {"favor_gflops": fav, "matmul_gflops": mm, "fraction": fav / mm}


def flops(name: str, length: int, cfg: BenchConfig) -> float | None:
    """Matmul flops of favor's bidirectional forward: 8 L M D per head (two feature
    projections, phi(K)^T V, phi(Q) (phi(K)^T V)); None for other contenders."""
    if name == "favor":
        return 8.0 * length * cfg.num_features * cfg.dim * cfg.heads * cfg.batch
    return None


# -- contenders ---------------------------------------------------------------------------
def bench_inputs(length: int, cfg: BenchConfig, grad: bool) -> list[torch.Tensor]:
    """q, k, v (B, H, L, D) for the benchmark configuration, seeded by cfg.seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.heads, length, cfg.dim)
    # drawn on the CPU (the same numbers on every device), then moved
    return [torch.randn(*shape, generator=gen).to(cfg.device, cfg.dtype).requires_grad_(grad) for _ in range(3)]


def bench_feature_map(cfg: BenchConfig) -> favor.FeatureMap:
    """The benchmarks' feature map (cfg.kernel, D, M), seeded by cfg.seed."""
    return favor.FeatureMap(
        cfg.kernel, dim=cfg.dim, num_features=cfg.num_features, generator=torch.Generator().manual_seed(cfg.seed)
    ).to(cfg.device)


def _favor(causal: bool):
    def build(cfg: BenchConfig):
        fm = bench_feature_map(cfg)
        return lambda q, k, v: favor.attention(q, k, v, fm, causal=causal)

    return build


def _favor_exact(causal: bool, terms):
    """favor.attention with exact terms (the issue's settings: causal W=64, S=4; bidirectional
    blocks of 32 widened by 8, one sink)."""

    def build(cfg: BenchConfig):
        fm = bench_feature_map(cfg)
        return lambda q, k, v: favor.attention(q, k, v, fm, causal=causal, exact=terms)

    return build


def _sdpa(causal: bool):
    def build(cfg: BenchConfig):
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return build


def _performer(causal: bool, *, kernel: bool = False):
    """performer-pytorch's FastAttention. Its causal mode takes the fast-transformers
    causal-product kernel only when that kernel's CUDA build imports; ``kernel`` makes it use
    the CPU build (benchmarks/fast_transformers_cpu.py installs it), as the issue measured."""

    def build(cfg: BenchConfig):
        from performer_pytorch import FastAttention
        from performer_pytorch.performer_pytorch import causal_linear_attention

        with contextlib.redirect_stdout(io.StringIO()):  # it prints when its CUDA kernel is missing
            attn = FastAttention(dim_heads=cfg.dim, nb_features=cfg.num_features, causal=causal)
        if kernel:
            attn.causal_linear_fn = causal_linear_attention
        return lambda q, k, v: attn(q, k, v)

    return build


def _peer_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Contender:
    build: Callable  # cfg -> f(q, k, v)
    causal: bool
    #: how time and memory grow with L, to skip configurations predicted to run too long
    exponent: float
    #: whether the implementation is installed
    available: Callable[[], bool] = field(default=lambda: True)


CONTENDERS: dict[str, Contender] = {
    "favor": Contender(_favor(False), False, 1.0),
    "sdpa": Contender(_sdpa(False), False, 2.0),
    "performer-pytorch": Contender(_performer(False), False, 1.0, lambda: _peer_available("performer_pytorch")),
    "favor-causal": Contender(_favor(True), True, 1.0),
    "favor-exact": Contender(_favor_exact(False, favor.ExactTerms(8, 1, 32)), False, 1.0),
    "favor-exact-causal": Contender(_favor_exact(True, favor.ExactTerms(64, 4, 1)), True, 1.0),
    "sdpa-causal": Contender(_sdpa(True), True, 2.0),
    "performer-pytorch-causal": Contender(_performer(True), True, 1.0, lambda: _peer_available("performer_pytorch")),
    "performer-pytorch-causal-ft": Contender(
        _performer(True, kernel=True),
        True,
        1.0,
        lambda: _peer_available("performer_pytorch") and _peer_available("fast_transformers.causal_product"),
    ),
}


def check_contender(name: str, cfg: BenchConfig, *, length: int = 256) -> tuple[bool, str]:
    """Compare a contender with its reference on a small input (float32).

    favor: the explicit L x L kernelised attention with the same feature map, 1e-4.
    SDPA: favor.softmax_attention (exact), 1e-4. performer-pytorch estimates softmax with
    its own random features, so only a sanity bound holds: finite, and its error vs exact
    softmax below that of uniform attention plus a margin (0.5 of the output scale).
    """
    contender = CONTENDERS[name]
    q, k, v = (t.float() for t in bench_inputs(length, cfg, grad=False))
    with torch.no_grad():
        out = contender.build(cfg)(q, k, v).float()
        exact = favor.softmax_attention(q, k, v, causal=contender.causal)
        if not torch.isfinite(out).all():
            return False, "non-finite output"
        if name.startswith("favor-exact"):
            fm = bench_feature_map(cfg).double()
            terms = favor.ExactTerms(64, 4, 1) if contender.causal else favor.ExactTerms(8, 1, 32)
            want = exact_terms_reference(q.double(), k.double(), v.double(), fm, terms, causal=contender.causal)
            err = (out.double() - want).abs().max().item()
            return err < 1e-4, f"max |favor - exact_terms_reference| = {err:.2e} (bound 1e-4)"
        if name.startswith("favor"):
            fm = bench_feature_map(cfg)
            want = favor.kernel_attention(q.double(), k.double(), v.double(), fm.double(), causal=contender.causal)
            err = (out.double() - want).abs().max().item()
            return err < 1e-4, f"max |favor - kernel_attention| = {err:.2e} (bound 1e-4)"
        if name.startswith("sdpa"):
            err = (out - exact).abs().max().item()
            return err < 1e-4, f"max |sdpa - exact softmax| = {err:.2e} (bound 1e-4)"
        scale = exact.abs().mean().item()
        err = (out - exact).abs().mean().item() / scale
        return math.isfinite(err) and err < 1.5, f"mean rel. error vs exact softmax = {err:.2f} (sanity bound 1.5)"


# -- timing -------------------------------------------------------------------------------
def run_once(f, q, k, v, backward: bool):
    """One call of contender ``f`` (forward, plus backward of a ones upstream gradient when
    ``backward``), gradients cleared."""
    if backward:
        out = f(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None
    else:
        with torch.no_grad():
            f(q, k, v)


def time_contenders(
    names: list[str], length: int, cfg: BenchConfig, *, backward: bool, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call, contenders interleaved round by round."""
    q, k, v = bench_inputs(length, cfg, grad=backward)
    fns = {n: CONTENDERS[n].build(cfg) for n in names}
    for _ in range(warmup):
        for f in fns.values():
            run_once(f, q, k, v, backward)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n, f in fns.items():
            sync(cfg.device)
            t0 = time.perf_counter()
            run_once(f, q, k, v, backward)
            sync(cfg.device)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


# -- memory -------------------------------------------------------------------------------
def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _memory_child(name: str, length: int, cfg: BenchConfig, backward: bool, threads: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    f = CONTENDERS[name].build(cfg)
    # one tiny call first: one-time library workspaces (BLAS, thread pools) are not the
    # contender's memory and would otherwise dominate short sequences
    run_once(f, *bench_inputs(min(length, 64), cfg, grad=backward), backward)
    q, k, v = bench_inputs(length, cfg, grad=backward)
    base = _maxrss_bytes()
    t0 = time.perf_counter()
    run_once(f, q, k, v, backward)
    return (_maxrss_bytes() - base) / 2**20, time.perf_counter() - t0


_POOL_CTX = None


def _context():
    global _POOL_CTX
    if _POOL_CTX is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _POOL_CTX = multiprocessing.get_context("forkserver")
            _POOL_CTX.set_forkserver_preload(["torch", "favor", "favor.benchmarking.timing"])
        else:
            _POOL_CTX = multiprocessing.get_context("spawn")
    return _POOL_CTX


def _cuda_peak_mib(name: str, length: int, cfg: BenchConfig, backward: bool) -> tuple[float, float]:
    """On a GPU: the caching allocator's peak above what the inputs hold, in this process."""
    f = CONTENDERS[name].build(cfg)
    run_once(f, *bench_inputs(min(length, 64), cfg, grad=backward), backward)
    q, k, v = bench_inputs(length, cfg, grad=backward)
    sync(cfg.device)
    torch.cuda.reset_peak_memory_stats(cfg.device)
    base = torch.cuda.memory_allocated(cfg.device)
    t0 = time.perf_counter()
    run_once(f, q, k, v, backward)
    sync(cfg.device)
    return (torch.cuda.max_memory_allocated(cfg.device) - base) / 2**20, time.perf_counter() - t0


def peak_memory_mib(name: str, length: int, cfg: BenchConfig, *, backward: bool) -> tuple[float, float]:
    """(peak MiB above baseline, seconds of that first, cold run) in a fresh process (on a
    GPU: in this one, from the allocator's statistics)."""
    if torch.device(cfg.device).type == "cuda":
        return _cuda_peak_mib(name, length, cfg, backward)
    with _context().Pool(1) as pool:
        return pool.apply(_memory_child, (name, length, cfg, backward, torch.get_num_threads()))


# -- the demo's table ---------------------------------------------------------------------
def speed_table(
    lengths: tuple[int, ...] = (1024, 4096, 16384),
    *,
    quick: bool = True,
    cfg: BenchConfig | None = None,
    memory: bool = True,
) -> list[dict]:
    """favor bidirectional (forward) and causal (forward + backward) vs SDPA at each length:
    milliseconds, peak MiB and speed-ups. Quick: one warm-up, median of 3 runs below 8192
    and of 1 run from there (the exact attention calls alone take seconds), about 40 s on
    a 2-core CPU; otherwise median of 5."""
    cfg = cfg or BenchConfig()
    rows = []
    for length in lengths:
        repeats = (1 if length >= 8192 else 3) if quick else 5
        warmup = 0 if (quick and length >= 8192) else 1
        fwd = time_contenders(["favor", "sdpa"], length, cfg, backward=False, repeats=repeats, warmup=warmup)
        both = time_contenders(
            ["favor-causal", "sdpa-causal"], length, cfg, backward=True, repeats=repeats, warmup=warmup
        )
        row = {
            "L": length,
            "favor_fwd_ms": 1e3 * fwd["favor"],
            "sdpa_fwd_ms": 1e3 * fwd["sdpa"],
            "fwd_speedup": fwd["sdpa"] / fwd["favor"],
            "favor_causal_fwdbwd_ms": 1e3 * both["favor-causal"],
            "sdpa_causal_fwdbwd_ms": 1e3 * both["sdpa-causal"],
            "causal_fwdbwd_speedup": both["sdpa-causal"] / both["favor-causal"],
        }
        if memory:
            for key, name, bwd in (
                ("favor_fwd_mib", "favor", False),
                ("sdpa_fwd_mib", "sdpa", False),
                ("favor_causal_fwdbwd_mib", "favor-causal", True),
                ("sdpa_causal_fwdbwd_mib", "sdpa-causal", True),
            ):
                if quick and name.startswith("sdpa") and length >= 8192:
                    row[key] = None  # a cold exact run of several seconds: left out of the quick table
                    continue
                row[key] = peak_memory_mib(name, length, cfg, backward=bwd)[0]
        log.info("speed_table L=%d: %s", length, row)
        rows.append(row)
    return rows


# -- decoding -----------------------------------------------------------------------------
def decode_latency(context: int, cfg: BenchConfig | None = None, *, steps: int = 50) -> dict[str, float]:
    """Seconds per generated token at a given context length: favor.step from the state vs
    SDPA over a preallocated KV cache (one new query against all cached keys)."""
    cfg = cfg or BenchConfig()
    fm = bench_feature_map(cfg)
    q, k, v = bench_inputs(context, cfg, grad=False)
    with torch.no_grad():
        _, state = favor.attention(q, k, v, fm, causal=True, return_state=True)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        new = torch.randn(steps + 1, 3, cfg.batch, cfg.heads, cfg.dim, generator=gen).to(cfg.device, cfg.dtype)
        cache_k = torch.empty(cfg.batch, cfg.heads, context + steps + 1, cfg.dim, device=cfg.device, dtype=cfg.dtype)
        cache_v = torch.empty_like(cache_k)
        cache_k[:, :, :context], cache_v[:, :, :context] = k, v

        def favor_step(i, st):
            out, st = favor.step(st, new[i, 0], new[i, 1], new[i, 2], fm)
            return st

        def sdpa_step(i, n):
            cache_k[:, :, n], cache_v[:, :, n] = new[i, 1], new[i, 2]
            F.scaled_dot_product_attention(new[i, 0][:, :, None], cache_k[:, :, : n + 1], cache_v[:, :, : n + 1])
            return n + 1

        state = favor_step(steps, state)  # warm-up
        n = sdpa_step(steps, context)
        # blocks of tokens, not token-by-token alternation: a decoder runs its own steps back
        # to back, and an SDPA step between two favor steps would evict favor's small state
        # from cache by streaming the whole KV cache
        tf, ts = [], []
        half = steps // 2
        for block in (range(half), range(half, steps)):
            state = _timed_steps(favor_step, block, state, cfg.device, tf)
            n = _timed_steps(sdpa_step, block, n, cfg.device, ts)
    return {"context": context, "favor_step_s": statistics.median(tf), "sdpa_kv_cache_s": statistics.median(ts)}


def _timed_steps(step, block, carry, device, into: list[float]):
    """carry = step(i, carry) for i in ``block``, each timed between device syncs into ``into``."""
    for i in block:
        sync(device)
        t0 = time.perf_counter()
        carry = step(i, carry)
        sync(device)
        into.append(time.perf_counter() - t0)
    return carry


def decode_flatness(
    contexts: tuple[int, ...] = (1024, 65536), cfg: BenchConfig | None = None, *, steps: int = 50, rounds: int = 6
) -> dict[int, float]:
    """Median seconds per favor.step after each context, the contexts taking turns: ``rounds``
    times, ``steps`` tokens back to back from each context's state. A step is the same
    (M' x Dv) update whatever the context, so separate runs differ by the machine's drift
    (sub-ms steps moved 1.8x between runs here); taking turns puts that drift on all alike."""
    cfg = cfg or BenchConfig()
    fm = bench_feature_map(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    new = torch.randn(steps, 3, cfg.batch, cfg.heads, cfg.dim, generator=gen).to(cfg.device, cfg.dtype)
    times: dict[int, list[float]] = {c: [] for c in contexts}
    with torch.no_grad():
        states = {}
        for c in contexts:
            q, k, v = bench_inputs(c, cfg, grad=False)
            states[c] = favor.attention(q, k, v, fm, causal=True, return_state=True)[1]
            favor.step(states[c], new[0, 0], new[0, 1], new[0, 2], fm)  # warm-up
        for _ in range(rounds):
            for c in contexts:
                st = states[c]  # every round restarts from the context's state
                for i in range(steps):
                    sync(cfg.device)
                    t0 = time.perf_counter()
                    _, st = favor.step(st, new[i, 0], new[i, 1], new[i, 2], fm)
                    sync(cfg.device)
                    times[c].append(time.perf_counter() - t0)
    return {c: statistics.median(t) for c, t in times.items()}
