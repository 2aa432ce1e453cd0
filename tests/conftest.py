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
