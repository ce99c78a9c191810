"""Protein families by shared k-mers: relatives side by side in a concatenated stream.

A random extract of Swiss-Prot concatenated in accession order holds almost nothing a
model can use beyond the next few residues (on the embedded 8,000: unigram 2.912 nats,
bigram 2.879, trigram 2.873), so long context has nothing to show. Concatenated TrEMBL
(the paper's long-protein data) is full of close relatives. ``families`` groups proteins
that share at least ``min_shared`` of their distinct k-mers with another one (single
linkage); ``family_order`` lists the proteins of families of two or more with each
family's members one after another, every member next to the relative it shares most
k-mers with where the chain allows; ``split_families`` divides whole families between
training and validation, so a validation protein's relatives are in the validation
stream, never in training.
"""

from __future__ import annotations

import collections

import numpy as np

__all__ = ["families", "family_order", "split_families"]

#: k-mers found in more proteins than this are left out of the counts (low-complexity runs
#: and ubiquitous motifs would join unrelated proteins and cost quadratic time)
MAX_POSTINGS = 50


def _shared_counts(seqs: list[str], k: int) -> tuple[list[set[str]], dict[tuple[int, int], int]]:
    kmers = [{s[j : j + k] for j in range(len(s) - k + 1)} for s in seqs]
    index: dict[str, list[int]] = collections.defaultdict(list)
    for i, ks in enumerate(kmers):
        for km in ks:
            index[km].append(i)
    pairs: collections.Counter = collections.Counter()
    for ids in index.values():
        if 1 < len(ids) <= MAX_POSTINGS:
            for a in range(len(ids)):
                for b in range(a + 1, len(ids)):
                    pairs[ids[a], ids[b]] += 1
    return kmers, pairs


def families(seqs: list[str], *, k: int = 5, min_shared: float = 0.1) -> list[list[int]]:
    """Indices of ``seqs`` grouped into families (single linkage: i and j are linked when
    they share at least ``min_shared`` of the smaller one's distinct ``k``-mers). Each
    family lists its members in chain order (see ``family_order``); families are ordered by
    their first member's index; singletons are families of one."""
    if not 0.0 < min_shared <= 1.0:
        raise ValueError(f"min_shared must be in (0, 1], got {min_shared!r}")
    kmers, pairs = _shared_counts(seqs, k)
    parent = list(range(len(seqs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    score: dict[int, dict[int, float]] = collections.defaultdict(dict)
    for (a, b), n in pairs.items():
        frac = n / max(1, min(len(kmers[a]), len(kmers[b])))
        if frac >= min_shared:
            score[a][b] = score[b][a] = frac
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i in range(len(seqs)):
        groups[root(i)].append(i)
    out = []
    for members in sorted(groups.values(), key=lambda m: m[0]):
        # greedy chain: from the first member, always step to the unvisited relative sharing
        # the most k-mers with the current one, else to the next unvisited member
        left, chain = set(members[1:]), [members[0]]
        while left:
            near = [(s, j) for j, s in score[chain[-1]].items() if j in left]
            nxt = max(near)[1] if near else min(left)
            chain.append(nxt)
            left.discard(nxt)
        out.append(chain)
    return out


def family_order(records: list[tuple[str, str]], *, k: int = 5, min_shared: float = 0.1) -> list[list[tuple[str, str]]]:
    """The families of two or more of ``records`` ((name, sequence) pairs), each a list of
    records in chain order; proteins with no relative in ``records`` are left out."""
    fams = families([s for _, s in records], k=k, min_shared=min_shared)
    return [[records[i] for i in f] for f in fams if len(f) > 1]


def split_families(
    fams: list[list[tuple[str, str]]], *, val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) records: whole families, in a numpy PCG64(seed) permutation, go to
    validation until it holds ``val_fraction`` of the proteins; each side keeps the
    families' order and each family's chain order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(fams) < 2:
        raise ValueError(f"need at least 2 families to split, got {len(fams)}")
    total = sum(len(f) for f in fams)
    perm = np.random.default_rng(seed).permutation(len(fams))
    val_ids, n = set(), 0
    for i in perm[:-1]:
        if n >= val_fraction * total:
            break
        val_ids.add(int(i))
        n += len(fams[i])
    train = [r for i, f in enumerate(fams) if i not in val_ids for r in f]
    val = [r for i, f in enumerate(fams) if i in val_ids for r in f]
    return train, val
