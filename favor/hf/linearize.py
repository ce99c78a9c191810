"""Linearizing a pretrained causal LM: the decoder recipe behind ``favor distill --model smollm2``.

In the spirit of LoLCATs (Zhang et al. 2024), sized for a CPU and a time budget:

0. ``performerize`` a copy of the softmax model (the teacher): dense-exponential features
   (M=256) calibrated on two training passages, exact weights for each query's last
   ``exact_window`` keys and the first ``exact_sinks`` tokens, FAVOR for the rest (the causal
   fast path of favor.ops.local);
1. attention transfer (favor.hf.fit.fit_adapters): each layer's adapter (query/key maps, key
   shift, projection, far keys' gain) fitted so that its FAVOR + exact-terms output matches
   its softmax output on the teacher's own queries, keys and values (no errors compounding);
2. fine-tuning (favor.hf.distill.distill, the encoder recipe's loop): the attention layers'
   query/key projections and the adapters (``train="attention"`` adds value and output), on
   packed passages of the training text, with the teacher's next-token distribution as the
   only target (KL).

``linearize`` evaluates before and after on held-out text of a domain never trained on
(favor.data.english's python-docs, or the caller's text): perplexity at several lengths for
the softmax model, the zero-shot and the distilled one, KL and top-1 agreement with the
teacher, and passkey retrieval (favor.hf.evaluate). The evaluations are timed against the budget too: the
fine-tuning gets what is left of ``minutes`` after the zero-shot evaluation, the transfer and
the final evaluation (estimated from the zero-shot one).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import matplotlib
import matplotlib.pyplot as plt
import torch
from torch import nn

from ..data.english import HELDOUT_DOMAIN, TRAIN_DOMAINS, domain_text, passages, text_passages
from .distill import SCHEDULES, TRAINABLE, DistillConfig, distill
from .evaluate import compare, passkey_accuracy, perplexity
from .fit import fit_adapters
from .performerize import performerize

__all__ = ["LinearizeConfig", "QUICK", "linearize", "train_batches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearizeConfig:
    """The decoder recipe's options (``favor distill`` for a causal LM sets them from flags).

    ``minutes``: the whole run's budget (evaluations included); ``steps``: at most that many
    fine-tuning steps (None: as many as the time allows); ``length``: tokens per
    training passage (packed, one domain each); ``fit_passages`` / ``fit_steps`` /
    ``transfer_share``: attention transfer on that many passages, at most that many steps
    per layer and that share of the training time; ``train``: the fine-tuned weights
    (favor.hf.distill.TRAINABLE); ``eval_lengths`` / ``eval_passages``: held-out perplexity
    (passages per length: ``eval_passages[i]`` for ``eval_lengths[i]``, the last one for the
    rest); ``passkey_lengths`` / ``passkey_trials``: passkey retrieval (``()``: none)."""

    minutes: float = 30.0
    steps: int | None = None
    length: int = 1024
    batch_size: int = 1
    calibration_passages: int = 2
    fit_passages: int = 1
    fit_steps: int = 30
    transfer_share: float = 0.1
    #: only FAVOR's adapters: with W=256 every other choice measured made held-out perplexity
    #: worse than zero-shot (query/key: 17.69 / 14.60 at 512 / 2,048 tokens against 17.08 /
    #: 14.52), the adapters alone better (17.10 / 14.21; benchmarks/results/llm_distill.md)
    train: str = "adapters"
    lr: float = 1e-4
    adapter_lr: float = 1e-3
    #: the far gain travels units of log-weight in the ~15 steps 30 CPU minutes give (at the
    #: adapters' 1e-3 it moves ~0.01): W=512 at 2,048 held-out tokens, 13.59 zero-shot ->
    #: 13.44 (1.047x softmax's; benchmarks/results/llm_distill.md, stop 24)
    gain_lr: float | None = 0.2
    attention_weight: float = 0.0
    schedule: str = "cosine"
    kernel: str = "derf"
    num_features: int = 256
    #: 512: held-out perplexity at 2,048 tokens 1.059x softmax's zero-shot and 1.047x distilled,
    #: against 1.13x / 1.107x at 256 and 1.42x / 1.36x at 64 (benchmarks/results/llm_distill.md);
    #: decoding pays for it in window bytes per token (docs/hf.md)
    exact_window: int = 512
    exact_sinks: int = 4
    exact_block: int = 1
    #: the key side tied per key/value group (favor.hf.tie) in calibration, attention transfer
    #: and fine-tuning: decoding keeps the far state once per key/value head (docs/hf.md). On
    #: by default: SmolLM2's perplexity the same as untied (13.47 against 13.44 at 2,048
    #: held-out tokens), a third of the far state, 1.10-1.14x the no-attention floor per
    #: token against ~1.18x untied (benchmarks/results/hf_generate_smollm2_w512_s4_s26_native.md)
    tie_keys: bool = True
    eval_lengths: tuple[int, ...] = (512, 2048)
    eval_passages: tuple[int, ...] = (4, 2, 1)
    passkey_lengths: tuple[int, ...] = (1024, 4096)
    passkey_trials: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.length < 16:
            raise ValueError(f"length must be >= 16 tokens, got {self.length}")
        if self.train not in TRAINABLE:
            raise ValueError(f"train must be one of {TRAINABLE}, got {self.train!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.fit_steps < 0:
            raise ValueError(f"fit_steps must be >= 0, got {self.fit_steps}")
        if not 0 <= self.transfer_share < 1:
            raise ValueError(f"transfer_share must lie in [0, 1), got {self.transfer_share}")
        if not self.eval_lengths or min(self.eval_lengths) < 3:
            raise ValueError(f"eval_lengths must be lengths >= 3, got {self.eval_lengths}")
        if not self.eval_passages or min(self.eval_passages) < 1:
            raise ValueError(f"eval_passages must be counts >= 1, got {self.eval_passages}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None, got {self.steps}")
        if self.passkey_trials < 1:
            raise ValueError(f"passkey_trials must be >= 1, got {self.passkey_trials}")
        for name in ("batch_size", "calibration_passages", "fit_passages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def passages_at(self, i: int) -> int:
        return self.eval_passages[min(i, len(self.eval_passages) - 1)]


#: ``favor distill --quick``: the recipe in seconds on a tiny random decoder (tests)
QUICK = dict(
    minutes=0.5,
    steps=4,
    length=128,
    fit_steps=3,
    num_features=16,
    exact_window=8,
    exact_sinks=1,
    eval_lengths=(64, 256),
    eval_passages=(2, 1),
    passkey_lengths=(512,),
    passkey_trials=2,
)


def train_batches(ids: torch.Tensor, batch_size: int) -> list[dict]:
    """Passages (P, L) as model batches of ``batch_size`` (the last one may be smaller)."""
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": torch.ones_like(ids[i : i + batch_size])}
        for i in range(0, len(ids), batch_size)
    ]


@dataclass
class _Clock:
    budget: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def _evaluate(teacher, student, held: dict, *, teacher_ppl: bool) -> tuple[dict, float]:
    """{length: compare(...)} and the seconds it took."""
    t = time.perf_counter()
    rows = {}
    for n, ids in held.items():
        if teacher_ppl:
            rows[n] = compare(teacher, student, ids)
        else:  # the student's perplexity alone (no teacher forward)
            rows[n] = {"perplexity": perplexity(student, ids)}
        log.info("held-out %d tokens: %s", n, rows[n])
    return rows, time.perf_counter() - t


def _passkey(model, tokenizer, config: LinearizeConfig) -> tuple[dict, float]:
    t = time.perf_counter()
    out = {
        n: passkey_accuracy(model, tokenizer, length=n, trials=config.passkey_trials, seed=config.seed)
        for n in config.passkey_lengths
    }
    return out, time.perf_counter() - t


def linearize(
    teacher: nn.Module,
    tokenizer,
    config: LinearizeConfig = LinearizeConfig(),
    *,
    text_ids: torch.Tensor | None = None,
    text_name: str | None = None,
    heldout: Sequence[str] | None = None,
    heldout_name: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict]:
    """(student, report): a linearized copy of the causal LM ``teacher`` and what was measured.

    ``text_ids`` (P, config.length): the training passages (default favor.data.english's
    training mix cut to ``config.length`` tokens), reported as ``text_name``. ``heldout``: the
    held-out texts, cut into passages at each evaluation length
    (favor.data.english.text_passages; default the python-docs domain), reported as
    ``heldout_name``. ``on_step(step, loss)`` after every
    fine-tuning step, ``stage(name)`` as each stage starts (the command prints them).
    The report holds the configuration, per-stage seconds, held-out perplexity at every
    length for softmax / zero-shot / after transfer (first length only) / distilled, KL and
    top-1 agreement, passkey accuracy for softmax and distilled, the fine-tuning losses and
    the transfer's per-layer relative attention errors."""
    say = stage or (lambda name: None)
    clock = _Clock(60.0 * config.minutes)
    teacher.eval()
    domains = list(TRAIN_DOMAINS) if text_ids is None else [text_name or "the caller's passages"]
    if text_ids is None:
        text_ids = passages(tokenizer, "train", length=config.length)
    if text_ids.dim() != 2 or text_ids.shape[1] < 2:
        raise ValueError(f"text_ids must be (passages, length), got {tuple(text_ids.shape)}")
    need = max(config.calibration_passages, config.fit_passages)
    if len(text_ids) < need:
        raise ValueError(f"the training text gives {len(text_ids)} passages of {text_ids.shape[1]}; need {need}")
    batches = train_batches(text_ids, config.batch_size)
    if heldout is None:
        heldout, heldout_name = [domain_text(HELDOUT_DOMAIN)], HELDOUT_DOMAIN
    heldout_name = heldout_name or "the held-out text"
    held = {
        n: text_passages(tokenizer, list(heldout), length=n, count=config.passages_at(i), name=heldout_name)
        for i, n in enumerate(config.eval_lengths)
    }
    seconds: dict[str, float] = {}

    say("performerize")
    t = time.perf_counter()
    calibration = train_batches(text_ids[: config.calibration_passages], 1)
    student = performerize(
        copy.deepcopy(teacher),
        kernel=config.kernel,
        num_features=config.num_features,
        seed=config.seed,
        calibration=calibration,
        exact_window=config.exact_window,
        exact_sinks=config.exact_sinks,
        exact_block=config.exact_block,
        tie_keys=config.tie_keys,
    )
    seconds["performerize"] = time.perf_counter() - t

    say("evaluate softmax and zero-shot")
    zero_shot, seconds["evaluate_zero_shot"] = _evaluate(teacher, student, held, teacher_ppl=True)
    softmax_passkey, seconds["passkey_softmax"] = _passkey(teacher, tokenizer, config)
    # the final evaluation: the same compare, and the student's passkey (its prefill costs 2-2.5x
    # softmax's on this CPU, W=64-512), plus saving
    reserve = seconds["evaluate_zero_shot"] + 2.5 * seconds["passkey_softmax"] + 0.02 * clock.budget

    fit: list[tuple[float, float]] = []
    after_transfer: dict = {}
    if config.transfer_share > 0 and config.fit_steps > 0:
        say("attention transfer")
        t = time.perf_counter()
        train_left = max(clock.left() - reserve, 1.0)
        fit = fit_adapters(
            student,
            train_batches(text_ids[: config.fit_passages], 1),
            steps=config.fit_steps,
            lr=config.adapter_lr,
            gain_lr=config.gain_lr,
            max_seconds=config.transfer_share * train_left,
            tie_keys=config.tie_keys,
        )
        seconds["transfer"] = time.perf_counter() - t
        first = config.eval_lengths[0]
        after_transfer, seconds["evaluate_transfer"] = _evaluate(
            teacher, student, {first: held[first]}, teacher_ppl=False
        )

    say("fine-tune")
    t = time.perf_counter()
    budget = clock.left() - reserve
    losses: list[float] = []
    if budget > 1.0:
        distill_config = DistillConfig(
            steps=config.steps or 1_000_000,
            max_seconds=budget,
            lr=config.lr,
            adapter_lr=config.adapter_lr,
            gain_lr=config.gain_lr,
            seed=config.seed,
            schedule=config.schedule,
            warmup_steps=3,
            train=config.train,
            attention_weight=config.attention_weight,
            hidden_weight=0.0,
            embedding_weight=0.0,
            logit_weight=1.0,
            # within the budget a passage is rarely seen twice: keeping the teacher's outputs
            # (logits are 200 MB per 1,024 tokens of a 49k vocabulary) would only cost memory
            teacher_cache_mb=0.0,
            tie_keys=config.tie_keys,
        )
        losses = distill(student, teacher, batches, distill_config, on_step=on_step)
    else:
        log.warning("no time left to fine-tune (%.0f s over the budget)", -budget)
    seconds["fine_tune"] = time.perf_counter() - t

    say("evaluate distilled")
    distilled, seconds["evaluate_distilled"] = _evaluate(teacher, student, held, teacher_ppl=True)
    student_passkey, seconds["passkey_distilled"] = _passkey(student, tokenizer, config)
    seconds["total"] = clock.elapsed()

    report = {
        "config": asdict(config),
        "training_domains": domains,
        "heldout_domain": heldout_name,
        "training_passages": len(text_ids),
        "training_tokens_seen": len(losses) * config.batch_size * text_ids.shape[1],
        "steps": len(losses),
        "losses": losses,
        "transfer_error": [{"before": b, "after": a} for b, a in fit],
        "perplexity": {
            str(n): {
                "softmax": zero_shot[n]["teacher_perplexity"],
                "zero_shot": zero_shot[n]["perplexity"],
                **({"after_transfer": after_transfer[n]["perplexity"]} if n in after_transfer else {}),
                "distilled": distilled[n]["perplexity"],
                "passages": len(held[n]),
            }
            for n in config.eval_lengths
        },
        "agreement": {
            str(n): {
                "zero_shot": {"kl": zero_shot[n]["kl"], "top1": zero_shot[n]["top1"]},
                "distilled": {"kl": distilled[n]["kl"], "top1": distilled[n]["top1"]},
            }
            for n in config.eval_lengths
        },
        "passkey": {
            str(n): {"softmax": softmax_passkey[n], "distilled": student_passkey[n]} for n in config.passkey_lengths
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return student, report


def plot_report(report: dict, path, *, title: str = "") -> None:
    """Three panels: held-out perplexity per length (softmax / zero-shot / distilled), the
    fine-tuning loss (KL to the teacher) per step, passkey accuracy per length."""
    matplotlib.use("Agg")

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
    lengths = list(report["perplexity"])
    names = ("softmax", "zero_shot", "distilled")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [report["perplexity"][n][name] for n in lengths]
        a1.bar([j + i * width for j in range(len(lengths))], values, width, label=name.replace("_", "-"))
    a1.set_xticks([j + width for j in range(len(lengths))], [f"{n} tokens" for n in lengths])
    a1.set_ylabel(f"held-out perplexity ({report['heldout_domain']})")
    a1.legend(fontsize=8)
    if report["losses"]:
        a2.plot(range(1, len(report["losses"]) + 1), report["losses"])
    a2.set_xlabel("fine-tuning step")
    a2.set_ylabel("KL(teacher || student), nats/token")
    keys = list(report["passkey"])
    for i, name in enumerate(("softmax", "distilled")):
        acc = [report["passkey"][n][name]["accuracy"] for n in keys]
        a3.bar([j + i * 0.4 for j in range(len(keys))], acc, 0.4, label=name)
    a3.set_xticks([j + 0.2 for j in range(len(keys))], [f"{n} tokens" for n in keys])
    a3.set_ylim(0, 1.05)
    a3.set_ylabel("passkey accuracy")
    a3.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(report: dict) -> Sequence[str]:
    """Lines for the terminal: perplexity per length, agreement, passkey, time."""
    lines = []
    for n, row in report["perplexity"].items():
        agree = report["agreement"][n]
        lines.append(
            f"held-out perplexity at {n} tokens: softmax {row['softmax']:.2f}, zero-shot {row['zero_shot']:.2f} "
            f"({row['zero_shot'] / row['softmax']:.3f}x), distilled {row['distilled']:.2f} "
            f"({row['distilled'] / row['softmax']:.3f}x); KL {agree['zero_shot']['kl']:.3f} -> "
            f"{agree['distilled']['kl']:.3f}, top-1 {agree['zero_shot']['top1']:.3f} -> {agree['distilled']['top1']:.3f}"
        )
    for n, row in report["passkey"].items():
        lines.append(
            f"passkey at {n} tokens: softmax {row['softmax']['accuracy']:.2f}, distilled {row['distilled']['accuracy']:.2f}"
        )
    lines.append(f"{report['steps']} fine-tuning steps; {report['seconds']['total']:.0f} s in all")
    return lines
