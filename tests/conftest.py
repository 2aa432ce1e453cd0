"""Shared test set-up.

TRITON_INTERPRET=1 must be set before any `@triton.jit` is applied, so it is set
here, before any project module is imported: kernels then run on CPU tensors
in Triton's interpreter when a test asks for `backend="triton"`. The `auto`
rule still picks the torch reference for CPU tensors.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
# one engine cache (converted models, embedding caches) for the whole session
os.environ.setdefault("ATELIER_TEST_CACHE", os.path.join(tempfile.gettempdir(), "atelier-test-cache"))

# Import hypothesis (and the module its pytest plugin imports at the end of the
# session) up front: CPython 3.11.7's ast.parse can fail with "AST constructor
# recursion depth mismatch" late in a session that ran deep recursions in other
# threads, and pytest's assertion rewriting parses modules on first import.
import hypothesis  # noqa: E402,F401
import hypothesis.internal.observability  # noqa: E402,F401
