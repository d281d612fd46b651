"""Host-side data pipeline: tokenizers, corpora, packing and resumable batch iteration."""

from pangu.data.corpus import (
    CorpusConfig,
    Split,
    corpus_fingerprint,
    document_split,
    load_documents,
    named_documents,
    stdlib_root,
)
from pangu.data.loader import Batch, BatchIterator, LMDataset, eval_batches
from pangu.data.packing import PackedRows, loss_mask, pack_documents
from pangu.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Batch",
    "BatchIterator",
    "ByteTokenizer",
    "CorpusConfig",
    "HFTokenizer",
    "LMDataset",
    "PackedRows",
    "Split",
    "Tokenizer",
    "corpus_fingerprint",
    "document_split",
    "eval_batches",
    "load_documents",
    "load_tokenizer",
    "loss_mask",
    "named_documents",
    "pack_documents",
    "stdlib_root",
]
