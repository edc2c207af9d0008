"""Data: the example schema, loaders for files and `datasets`, chat formatting, batching."""
from .formatting import ChatFormatter, TokenizedExample, collate, refusal_examples, tokenize_examples
from .loaders import load_examples, read_jsonl, write_jsonl
from .schema import Behavior, DataError, Example

__all__ = [
    "Behavior",
    "ChatFormatter",
    "DataError",
    "Example",
    "TokenizedExample",
    "collate",
    "load_examples",
    "read_jsonl",
    "refusal_examples",
    "tokenize_examples",
    "write_jsonl",
]
