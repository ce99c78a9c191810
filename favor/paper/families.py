"""Protein families without annotations: homology clusters from shared k-mers.

The paper's out-of-distribution split holds out 20 Pfam families. favor's proteins carry
accessions only, so families are approximated by homology clusters: two proteins are
linked when they share an exact k-mer of residues (k = 10 by default: 20^10 = 1e13 possible
words against a few million in the corpus, so chance matches are rare; k = 8 chained a
third of the 8,000 embedded proteins into one cluster through shared motifs), and a
cluster is a connected component of that graph.
``family_split`` holds out whole clusters (OOD), then draws a random test set from the rest.
"""

from __future__ import annotations

import numpy as np

__all__ = ["homology_clusters", "family_split"]


def homology_clusters(seqs: list[str], *, k: int = 10, max_owners: int = 20) -> np.ndarray:
    """Cluster id (int, 0..C-1) per sequence: connected components of 'shares a k-mer'
    (words of fewer than k/2 distinct residues, or in more than ``max_owners`` proteins, ignored)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 12:
        raise ValueError(f"k must be an int in [1, 12], got {k!r}")
    lut = np.full(256, 25, dtype=np.int64)
    for i, ch in enumerate("ACDEFGHIKLMNPQRSTVWYXBZUO"):
        lut[ord(ch)] = i
    hashes, owners = [], []
    for pid, s in enumerate(seqs):
        a = lut[np.frombuffer(s.upper().encode("ascii", errors="replace"), dtype=np.uint8)]
        if a.size < k:
            continue
        n = a.size - k + 1
        h = np.zeros(n, dtype=np.int64)
        for j in range(k):
            h = h * 26 + a[j : n + j]
        # low-complexity words (poly-Q, repeats, tags) chain unrelated proteins: keep
        # words of at least k/2 distinct residues
        windows = np.lib.stride_tricks.sliding_window_view(a, k)
        srt = np.sort(windows, axis=1)
        distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(1)
        h = np.unique(h[distinct >= (k + 1) // 2])
        hashes.append(h)
        owners.append(np.full(h.size, pid, dtype=np.int64))
    parent = np.arange(len(seqs))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    if hashes:
        h, o = np.concatenate(hashes), np.concatenate(owners)
        order = np.argsort(h, kind="stable")
        h, o = h[order], o[order]
        # words shared by more than max_owners proteins are motifs, not homology
        starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
        counts = np.diff(np.r_[starts, h.size])
        common = np.repeat(counts > max_owners, counts)
        same = np.flatnonzero((h[1:] == h[:-1]) & ~common[1:])
        for i in same:  # link consecutive owners of the same word
            a, b = find(int(o[i])), find(int(o[i + 1]))
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(len(seqs))])
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def family_split(
    seqs: list[str],
    *,
    ood_families: int = 20,
    min_family: int = 3,
    test_fraction: float = 0.05,
    seed: int = 0,
    k: int = 10,
    max_fraction: float = 0.02,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(train, test, ood) index arrays and a description. OOD: ``ood_families`` clusters of
    at least ``min_family`` proteins, drawn at random (numpy PCG64(seed)) among those, no
    cluster larger than ``max_fraction`` of the corpus; test: ``test_fraction`` of the rest at random."""
    ids = homology_clusters(seqs, k=k)
    sizes = np.bincount(ids)
    limit = max(min_family, int(max_fraction * len(seqs)))
    eligible = np.flatnonzero((sizes >= min_family) & (sizes <= limit))
    if eligible.size < ood_families:
        raise ValueError(
            f"only {eligible.size} clusters of {min_family}..{limit} proteins, need ood_families={ood_families}"
        )
    rng = np.random.default_rng(seed)
    held = rng.choice(eligible, size=ood_families, replace=False)
    is_ood = np.isin(ids, held)
    rest = np.flatnonzero(~is_ood)
    n_test = max(1, int(round(test_fraction * len(seqs))))
    test = np.sort(rng.choice(rest, size=n_test, replace=False))
    train = np.setdiff1d(rest, test)
    info = {
        "clusters": int(sizes.size),
        "singletons": int((sizes == 1).sum()),
        "largest_cluster": int(sizes.max()),
        "ood_family_sizes": sorted(int(sizes[c]) for c in held),
        "k": k,
    }
    return train, test, np.flatnonzero(is_ood), info
