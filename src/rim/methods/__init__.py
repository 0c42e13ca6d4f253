"""Methods as small plug-ins over one harness (``rim.methods.base``), one module each."""

from rim.methods import codi, coconut, icot, pause, rim, sft  # noqa: F401  (each registers its method)
from rim.methods.base import METHODS, Method, TokenizedExample, make_method, register, tokenize_example

__all__ = ["METHODS", "Method", "TokenizedExample", "make_method", "register", "tokenize_example"]
