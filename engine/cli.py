"""What every ``python -m engine.*`` command shares: logging setup and one-line errors instead of tracebacks."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; bad input (any ``ValueError``/``OSError``) ends with ``error: …`` and exit code 2."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted: nothing was published under the output name", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
