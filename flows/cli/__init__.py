"""Command-line entry points (thin: parse, call the library, turn FlowsError into a message)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from flows.errors import FlowsError


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except FlowsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
