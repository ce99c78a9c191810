"""Running a set of attention variants over seeds and writing the JSON, table and plot.

Shared by every training experiment: ``run_suite`` trains each (variant, seed) with
``harness.train_run`` under one tqdm bar (the CLI passes it), skipping variants whose
library is missing; ``suite_table`` is the markdown table at equal steps and equal time;
``save_suite`` writes ``NAME.json`` (curves), ``NAME.md`` (table) and ``NAME.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .harness import ModelSize, Variant, plot_curves, train_run, unavailable
from .report import markdown_table, write_outputs

__all__ = ["run_suite", "suite_table", "save_suite", "jsonable", "progress_bar", "add_common_arguments"]


def add_common_arguments(parser, *, seeds: int) -> None:
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per variant (default {seeds}; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the mode's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def progress_bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def jsonable(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "model"}


def run_suite(
    task,
    variants: list[Variant],
    size: ModelSize,
    *,
    seeds: list[int],
    steps: int,
    eval_every: int,
    progress=None,
    keep_models: bool = False,
    on_run=None,
    **train_kw,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(runs, skipped): seeds outermost, so a cut-short run still has every variant of the
    first seed. ``progress`` is a tqdm-like bar (``update``, ``set_postfix_str``);
    ``on_run(runs)`` is called after every finished run (to save partial results)."""
    skipped = {v.name: why for v in variants if (why := unavailable(v))}
    runs = []
    for seed in seeds:
        for v in variants:
            if v.name in skipped:
                continue
            if progress is not None:
                progress.set_postfix_str(f"{v.name} seed {seed}")
            r = train_run(
                task,
                v,
                size,
                seed=seed,
                steps=steps,
                eval_every=eval_every,
                progress=progress.update if progress is not None else None,
                **train_kw,
            )
            if not keep_models:
                r.pop("model")
            runs.append(r)
            if on_run is not None:
                on_run(runs)
    return runs, skipped


def suite_table(
    summary: dict[str, Any],
    *,
    metric: str = "accuracy",
    baseline: dict[str, float] | None = None,
    skipped: dict[str, str] | None = None,
    metric_label: str | None = None,
) -> str:
    label = metric_label or metric
    header = [
        "variant",
        "seeds",
        f"{label} @ step {summary['step']}",
        f"loss @ step {summary['step']}",
        f"{label} @ {summary['time']:.0f} s",
        "steps in that time",
        "s/step",
        "diverged (seeds)",
    ]
    rows = []
    for name, r in summary["variants"].items():
        if f"{metric}@step" not in r:
            rows.append([name, r["seeds"], "NaN", "NaN", "NaN", "-", "-", r["diverged"]])
            continue
        rows.append(
            [
                name,
                r["seeds"],
                r[f"{metric}@step"],
                r["loss@step"],
                r[f"{metric}@time"],
                f"{r['steps@time']:.0f}",
                r["sec_per_step"],
                r["diverged"] or "-",
            ]
        )
    if baseline is not None:
        rows.append(["unigram baseline", "-", baseline[metric], baseline["loss"], baseline[metric], "-", "-", "-"])
    for name, why in (skipped or {}).items():
        rows.append([name, 0, f"skipped: {why}", "", "", "", "", ""])
    return markdown_table(header, rows)


def save_suite(
    out: str | Path,
    name: str,
    res: dict[str, Any],
    table: str,
    *,
    metric: str,
    title: str,
    extra=None,
) -> dict[str, Path]:
    """An experiment's result ``res`` (with its ``runs``) as NAME.json, NAME.md (``table``)
    and NAME.png (the runs' curves of ``metric``)."""
    payload = {**{k: v for k, v in res.items() if k != "runs"}, "runs": [jsonable(r) for r in res["runs"]]}
    paths = write_outputs(Path(out), name, payload, table)
    paths["png"] = Path(out) / f"{name}.png"
    plot_curves(res["runs"], paths["png"], metric=metric, title=title, extra=extra)
    return paths


def run_command(args, name: str, experiment, save, *, incremental: bool = True, unit: str = "step", **options) -> int:
    """The body of ``favor paper NAME``: torch threads, a progress bar, ``experiment(quick=,
    progress=, **options)`` (in full mode with ``incremental``, ``save(args, result)`` after
    every finished run, so a run cut short still leaves its results), then ``save`` once more,
    the table printed and the files listed."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    bar = progress_bar(0, name)
    bar.unit = unit
    if incremental and not args.quick:
        options["on_result"] = lambda r: save(args, r)
    res = experiment(quick=args.quick, progress=bar, **options)
    bar.close()
    table, paths = save(args, res)
    print(table)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0
