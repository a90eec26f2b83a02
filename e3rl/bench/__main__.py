"""`python -m e3rl.bench {generator,learner,lengths,sync} [--out FILE.json] [...]`"""
from __future__ import annotations

import importlib
import sys

BENCHES = ("generator", "learner", "lengths", "sync")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m e3rl.bench {{{','.join(BENCHES)}}} [--out FILE.json] ...", file=sys.stderr)
        return 2
    return importlib.import_module(f"e3rl.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
