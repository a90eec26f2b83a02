"""Entry point: `python -m e3rl.run [CONFIG.yaml] [section.key=value ...] [--rehearse [--plan]]`.

`--rehearse` runs the config end to end at toy size on this machine (a tiny model of the same
architecture, lengths and batches scaled together, 2 steps with a resume) and checks what it
exercised; `--rehearse --plan` prints what it would scale and checks the rest in seconds
(e3rl/rehearsal). Run it before spending GPU hours on a config.

Embedded (no cluster): starts a local Ray sized to this machine. On a cluster:
`ray job submit --address http://HEAD:8265 --working-dir . -- python -m e3rl.run CONFIG.yaml`
(or set `resources.address` / `RAY_ADDRESS`). Bad input stops it with one line and exit code 2;
a run halted by repeated non-finite steps (`run.max_skipped_steps`) with one line and exit code 3.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

from e3rl.config import ConfigError, RunHalted, load_config

log = logging.getLogger("e3rl")


FLAGS = ("--rehearse", "--plan")


def _usage_error(message: str) -> None:
    print(f"e3rl: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str]) -> tuple[str | None, list[str], set[str]]:
    """(YAML path, overrides, flags): the first argument is a YAML path unless it is an override
    (contains `=`); flags may stand anywhere."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - set(FLAGS)
    if unknown:
        _usage_error(f"unknown option {sorted(unknown)[0]} — options: {', '.join(FLAGS)} (see --help)")
    if "--plan" in flags and "--rehearse" not in flags:
        _usage_error("--plan goes with --rehearse — python -m e3rl.run CONFIG --rehearse --plan")
    argv = [a for a in argv if not a.startswith("--")]
    if argv and "=" not in argv[0]:
        return argv[0], argv[1:], flags
    return None, argv, flags


class StopFlag:
    """SIGTERM / Ctrl-C: finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.stop = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:  # second signal: give up immediately
            raise KeyboardInterrupt
        log.warning("signal %d: stopping after this step and writing a checkpoint", signum)
        self.stop = True


def _ray_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _quiet_ray(was_up: bool) -> None:
    """Disconnect the Ray this run connected before the error line, so actor logs that Ray forwards
    late cannot follow it (a Ray the caller had started is left alone)."""
    if _ray_up() and not was_up:
        sys.modules["ray"].shutdown()


def main(argv: list[str] | None = None) -> int:
    path, overrides, flags = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ray_was_up = _ray_up()
    try:
        cfg = load_config(path, overrides)
        if "--rehearse" in flags:
            from e3rl.rehearsal.runner import rehearse

            return rehearse(cfg, "--plan" in flags, StopFlag())
        from e3rl.session import run_session

        summary = run_session(cfg, StopFlag())
    except (ConfigError, RunHalted) as e:  # bad input: exit 2; a halted run: exit 3
        _quiet_ray(ray_was_up)
        print(f"e3rl: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 3
    print(f"e3rl: done — summary in {Path(cfg.run.output_dir) / 'summary.json'}: "
          f"reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}, "
          f"held-out accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}, "
          f"{summary['samples_per_s']:.2f} samples/s, {summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
