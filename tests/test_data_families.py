"""favor.data.families: k-mer families against a brute-force reference, chain order, and
the split that keeps whole families on one side."""

from __future__ import annotations

import numpy as np
import pytest

from favor.data.families import families, family_order, split_families

RES = "ACDEFGHIKLMNPQRSTVWY"


def mutate(seq: str, rate: float, rng) -> str:
    return "".join(RES[rng.integers(20)] if rng.random() < rate else c for c in seq)


def random_proteins(n_fam: int, per: int, length: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_fam):
        base = "".join(RES[i] for i in rng.integers(0, 20, length))
        seqs += [mutate(base, 0.05, rng) for _ in range(per)]
    seqs += ["".join(RES[i] for i in rng.integers(0, 20, length)) for _ in range(5)]  # loners
    order = rng.permutation(len(seqs))
    return [seqs[i] for i in order]


def reference_families(seqs: list[str], k: int, min_shared: float) -> set[frozenset[int]]:
    """Brute force: every pair's shared distinct k-mers, then connected components."""
    kmers = [{s[j : j + k] for j in range(len(s) - k + 1)} for s in seqs]
    comp = list(range(len(seqs)))
    for a in range(len(seqs)):
        for b in range(a + 1, len(seqs)):
            if len(kmers[a] & kmers[b]) >= min_shared * min(len(kmers[a]), len(kmers[b])):
                ca, cb = comp[a], comp[b]
                comp = [ca if c == cb else c for c in comp]
    out: dict[int, set[int]] = {}
    for i, c in enumerate(comp):
        out.setdefault(c, set()).add(i)
    return {frozenset(v) for v in out.values()}


@pytest.mark.parametrize("min_shared", [0.1, 0.3])
def test_families_match_the_brute_force_reference(min_shared):
    seqs = random_proteins(6, 4, 80, seed=1)
    got = families(seqs, k=5, min_shared=min_shared)
    assert {frozenset(f) for f in got} == reference_families(seqs, 5, min_shared)
    assert sorted(i for f in got for i in f) == list(range(len(seqs)))
    assert [f[0] for f in got] == sorted(f[0] for f in got)
    # 5 % mutations from one base leave two siblings ~0.95^10 = 60 % of 5-mers shared: the 6 planted families
    # and the 5 loners (random 80-mers share no 5-mer with odds ~ 80^2 / 20^5 ~ 0.2 % a pair)
    assert sorted(len(f) for f in got) == [1] * 5 + [4] * 6


def test_family_chain_steps_to_the_closest_relative():
    rng = np.random.default_rng(0)
    base = "".join(RES[i] for i in rng.integers(0, 20, 200))
    far, near = mutate(base, 0.12, rng), mutate(base, 0.02, rng)
    # base first, then its close copy, then the distant one, though the distant one comes first
    assert families([base, far, near], k=5, min_shared=0.1) == [[0, 2, 1]]


def test_family_order_drops_loners_and_split_keeps_families_whole():
    seqs = random_proteins(20, 3, 60, seed=2)
    records = [(f"p{i}", s) for i, s in enumerate(seqs)]
    fams = family_order(records)
    assert len(fams) == 20 and all(len(f) == 3 for f in fams)
    train, val = split_families(fams, val_fraction=0.1, seed=0)
    assert len(val) == 6 and len(train) == 54  # two whole families reach 10 % of 60
    fam_of = {name: i for i, f in enumerate(fams) for name, _ in f}
    assert not {fam_of[n] for n, _ in train} & {fam_of[n] for n, _ in val}
    assert split_families(fams, val_fraction=0.1, seed=0) == (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        split_families(fams, val_fraction=1.0)
    with pytest.raises(ValueError, match="min_shared"):
        families(seqs, min_shared=0.0)
