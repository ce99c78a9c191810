"""Sequence-parallel causal FAVOR: communication per layer, time and peak memory per process.

    python -m benchmarks.distributed_sequence_parallel [--length 65536] [--reps 3] [--out runs/bench]

Configuration (issue 6): B=1, H=8, D=64, M=256 positive features, float32, fwd+bwd of one
causal attention layer. Compared: one process holding the whole sequence (with 1 thread and
with W threads) against W gloo processes with 1 thread each holding L/W positions, on the
same machine. Every run is a fresh process, so its peak RSS is its own.

Before timing, the W-process path is checked against single-process attention at a small
length (outputs and gradients, float32 tolerance); it is not timed if that fails.
Communication is counted by favor.distributed.count_communication (the payload this
process hands to the collectives) for several lengths: it must not depend on L.
Wall time on a shared machine depends on its load; CPU seconds per process (all threads
of the busiest process) measure the work each process does. Writes JSON and a PNG under --out.
"""

from __future__ import annotations

import os

# passive OpenMP waiting before torch starts (as benchmarks/_common.py): on a shared machine
# spinning threads steal the cores the other process needs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import favor  # noqa: E402
from favor.distributed import count_communication, sequence_parallel_attention, shard_bounds, state_bytes  # noqa: E402

B, H, D, M = 1, 8, 64, 256


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples this process's RSS every 2 ms in a thread: peak above the level at start."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def _inputs(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, length, D, generator=g) for _ in range(3))
    up = torch.randn(B, H, length, D, generator=g)
    fm = favor.FeatureMap("positive", dim=D, num_features=M, generator=torch.Generator().manual_seed(1))
    return q, k, v, up, fm


def _fwd_bwd(fn, q, k, v, up):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(up)
    return out.detach(), q.grad, k.grad, v.grad


def _worker(rank: int, world: int, init_file: str, out_dir: str, task: str, length: int, reps: int, threads: int):
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    lo, hi = shard_bounds(length, world, rank)
    # timing runs allocate only their own slice, so the peak RSS is what a rank really holds
    q, k, v, up, fm = _inputs(length) if task != "time" else _inputs(hi - lo, seed=rank)
    if task == "time":
        lo, hi = 0, hi - lo
    sl = slice(lo, hi)
    res: dict = {"rank": rank}

    def sp(q_, k_, v_):
        return sequence_parallel_attention(q_, k_, v_, fm)

    if task == "check":
        ref = _fwd_bwd(lambda a, b, c: favor.attention(a, b, c, fm, causal=True), q, k, v, up)
        got = _fwd_bwd(sp, q[..., sl, :], k[..., sl, :], v[..., sl, :], up[..., sl, :])
        res["rel_err"] = max(
            float((g - r[..., sl, :]).abs().max() / r.abs().max()) for g, r in zip(got, ref, strict=True)
        )
    elif task == "comm":
        xs = [t[..., sl, :].contiguous() for t in (q, k, v, up)]
        with count_communication() as c:
            _fwd_bwd(sp, *xs)
        res.update(forward_bytes=c.forward_bytes, forward_calls=c.forward_calls)
        res.update(backward_bytes=c.backward_bytes, backward_calls=c.backward_calls)
    else:  # time
        xs = [q, k, v, up]
        del q, k, v, up
        times, cpu = [], []
        with _PeakRSS() as mem:
            for i in range(reps + 1):
                if world > 1:
                    dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                _fwd_bwd(sp, *xs)
                c1 = time.process_time()
                if world > 1:
                    dist.barrier()  # the step is done when the slowest rank is
                if i:  # the first run is warm-up
                    times.append(time.perf_counter() - t0)
                    cpu.append(c1 - c0)
        res.update(
            times=times,
            median_s=statistics.median(times),
            median_cpu_s=statistics.median(cpu),
            peak_above_inputs_mb=(mem.peak - mem.base) / 2**20,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            inputs_mb=sum(t.numel() * t.element_size() for t in xs) / 2**20,
        )
    with open(os.path.join(out_dir, f"{task}-{world}-{rank}.json"), "w") as f:
        json.dump(res, f)
    if world > 1:
        dist.destroy_process_group()


def _launch(task: str, world: int, length: int, *, reps: int = 0, threads: int = 1) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, os.path.join(tmp, "store"), tmp, task, length, reps, threads)
        mp.spawn(_worker, args=args, nprocs=world, join=True)
        return [json.loads(Path(tmp, f"{task}-{world}-{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    w = args.world
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "config": {"B": B, "H": H, "D": D, "M": M, "dtype": "float32", "kernel": "positive", "world": w},
    }
    print(json.dumps(info))
    check = _launch("check", w, 2048)
    err = max(r["rel_err"] for r in check)
    print(f"check: {w} processes vs 1 at L=2048, max rel err (out, dq, dk, dv) = {err:.2e}")
    if not err < 1e-4:
        print("sequence-parallel result disagrees with single-process attention: not timing it")
        return 1
    comm = {}
    for length in (4096, 16384, args.length):
        rows = _launch("comm", w, length)
        comm[length] = rows[0]
        print(
            f"comm L={length}: per rank per layer forward {rows[0]['forward_bytes']} B in {rows[0]['forward_calls']} "
            f"all-gather, backward {rows[0]['backward_bytes']} B in {rows[0]['backward_calls']} collective"
        )
    payload = state_bytes((B, H), M, D)
    runs = {
        "1 process, 1 thread": _launch("time", 1, args.length, reps=args.reps, threads=1),
        f"1 process, {w} threads": _launch("time", 1, args.length, reps=args.reps, threads=w),
        f"{w} processes, 1 thread each": _launch("time", w, args.length, reps=args.reps, threads=1),
    }
    summary = {}
    for name, rows in runs.items():
        summary[name] = {
            "median_s": max(r["median_s"] for r in rows),
            "median_cpu_s_per_process": max(r["median_cpu_s"] for r in rows),
            "peak_above_inputs_mb_per_process": max(r["peak_above_inputs_mb"] for r in rows),
            "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in rows),
            "inputs_mb_per_process": max(r["inputs_mb"] for r in rows),
            "times": [r["times"] for r in rows],
        }
        s = summary[name]
        print(
            f"L={args.length} {name}: fwd+bwd {s['median_s']:.2f} s wall, {s['median_cpu_s_per_process']:.2f} s CPU "
            f"(medians; CPU: the busiest process, all its threads), per process: inputs (q, k, v, dout) "
            f"{s['inputs_mb_per_process']:.0f} MB, peak above inputs {s['peak_above_inputs_mb_per_process']:.0f} MB, "
            f"peak RSS {s['peak_rss_mb_per_process']:.0f} MB"
        )
    result = {
        **info,
        "length": args.length,
        "check_rel_err": err,
        "state_payload_bytes": payload,
        "ring_allgather_bytes_sent_per_rank": (w - 1) * payload,
        "comm": comm,
        "runs": summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_sequence_parallel.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(summary)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        axes[0].barh(names, [summary[n]["median_s"] for n in names])
        axes[0].set_xlabel("fwd+bwd seconds (median)")
        axes[1].barh(names, [summary[n]["peak_rss_mb_per_process"] for n in names])
        axes[1].set_xlabel("peak RSS per process (MB)")
        fig.suptitle(f"causal FAVOR, L={args.length}, B={B} H={H} D={D} M={M}; all-gather payload {payload} B/layer")
        fig.tight_layout()
        fig.savefig(out / "distributed_sequence_parallel.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    print(f"wrote {out / 'distributed_sequence_parallel.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
