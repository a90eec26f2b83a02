"""Benchmarks: scripts that print numbers and ratios against a baseline run in the same process."""
from __future__ import annotations

import json
from typing import Any, Optional


def report(result: dict[str, Any], out: Optional[str], indent: int = 2) -> int:
    """Print the result as JSON and write it to `out` if given. -> exit code 0."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0
