"""Small helpers the benchmark scripts share."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on localhost now (for an embedded server a benchmark starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank, rounded to 0.1 ms; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def write_results(out: Path, stem: str, report: dict[str, Any], markdown: str) -> None:
    """``stem.json`` and ``stem.md`` under ``out`` (created if missing); the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
