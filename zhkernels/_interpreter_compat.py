"""Keep Triton's CPU interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) working on every Triton we support.

Triton 3.3–3.6's interpreter turns a scalar into a Python int with ``int(array)`` on a shape-(1,) array,
which numpy ≥ 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every
loop with a runtime bound fails there. Triton 3.7 squeezes the array first; :func:`apply` installs the
same one-line conversion on the older interpreters. Compiled kernels (a GPU) never run this code.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def needs_index_fix(triton_version: str, numpy_version: str = np.__version__) -> bool:
    """Whether this Triton's interpreter trips over numpy's refusal to ``int()`` a shape-(1,) array."""
    return _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4)


def apply() -> bool:
    """Patch the interpreter where :func:`needs_index_fix` says so (idempotent); returns whether it patched."""
    import triton
    from triton.runtime import interpreter

    if not needs_index_fix(triton.__version__):
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a layout we do not know: leave it, the interpreter tests will say what fails
        logger.warning(
            "Triton %s's interpreter has no _patch_lang_tensor: loops may fail with numpy %s",
            triton.__version__,
            np.__version__,
        )
        return False
    if getattr(original, "_zhllm_index_fix", False):
        return True

    def index(self) -> int:
        return int(self.handle.data.squeeze())

    def patch_lang_tensor(tensor, *scope):  # Triton 3.4+ passes a patch scope; 3.3 sets attributes directly
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor._zhllm_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
