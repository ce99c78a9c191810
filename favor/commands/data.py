"""favor data: fetch the full Swiss-Prot set (Debian metastudent-data) for long runs."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..data.fasta import write_fasta
from ..data.swissprot import download_package, extract, fetch_swissprot, read_metastudent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=["swissprot"], help="which corpus")
    parser.add_argument("--out", required=True, help="directory for swissprot.fasta.gz")
    parser.add_argument("--root", help="an already unpacked metastudent-data package (skips apt-get download)")
    parser.add_argument("--extract", type=int, help="also write a seeded extract of this many proteins")
    parser.add_argument("--extract-seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, help="extract only proteins up to this length")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            root = args.root
            if root is None:
                print("downloading metastudent-data (225 MB) with apt-get ...", flush=True)
                root = download_package(Path(tmp))
            path = fetch_swissprot(out, root=root, progress=lambda m: print(m, flush=True))
            print(f"wrote {path}")
            if args.extract:
                seqs = read_metastudent(root)
                recs = extract(seqs, num_proteins=args.extract, seed=args.extract_seed, max_length=args.max_length)
                dest = out / f"swissprot_{args.extract}.fasta.gz"
                write_fasta(dest, recs)
                print(f"wrote {dest}: {len(recs)} proteins, {sum(len(s) for _, s in recs)} residues")
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"favor data: {e}")
        return 2
    return 0
