"""Protein data: the embedded Swiss-Prot extract, tokenizer, splits, and the full set on demand."""

from .corpus import EMBEDDED, TokenStream, load_proteins, split
from .fasta import read_fasta, write_fasta
from .tokenizer import RESIDUES, SPECIALS, ProteinTokenizer

__all__ = [
    "EMBEDDED",
    "load_proteins",
    "split",
    "TokenStream",
    "ProteinTokenizer",
    "RESIDUES",
    "SPECIALS",
    "read_fasta",
    "write_fasta",
]
