"""Methods as small plug-ins over one harness: they differ only in training layout and inference prompt."""

from rim.methods.base import METHODS, Method, TokenizedExample, make_method, tokenize_example

__all__ = ["METHODS", "Method", "TokenizedExample", "make_method", "tokenize_example"]
