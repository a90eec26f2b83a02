"""Entry point: `python -m e3rl.run [CONFIG.yaml] [section.key=value ...]`.

Also what `ray job submit -- python -m e3rl.run ...` runs on a cluster.
"""
from __future__ import annotations

import sys

import yaml

from e3rl.config import ConfigError, load_config


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is a YAML path unless it is an override (contains `=`)."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"e3rl: config error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
