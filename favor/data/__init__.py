"""Training data: the embedded Swiss-Prot extract, FASTA and plain text, tokenizers, splits."""

from .corpus import EMBEDDED, TokenStream, load_proteins, split
from .fasta import read_fasta, write_fasta
from .source import OBJECTIVES, TrainingData, load_training_data, mask_tokens, model_vocab
from .text import ByteTokenizer, data_files, detect_format, load_tokenizer
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
    "OBJECTIVES",
    "TrainingData",
    "load_training_data",
    "mask_tokens",
    "model_vocab",
    "ByteTokenizer",
    "data_files",
    "detect_format",
    "load_tokenizer",
]
