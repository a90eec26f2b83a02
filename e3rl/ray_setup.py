"""Connecting to Ray: a cluster address (config or $RAY_ADDRESS) or an embedded local Ray.

Failures are answered in seconds with one line: an address that does not answer is probed with
a TCP connect before `ray.init` (which can otherwise retry for minutes); an address that answers
but is not Ray (e.g. the dashboard's port) gets `connect_timeout_s` to become a Ray connection;
and resources the cluster does not have are refused before any actor is created (an actor would
pend forever).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

from e3rl.config import Config, ConfigError, ResourcesConfig


@dataclass(frozen=True)
class RayInfo:
    address: str
    embedded: bool
    dashboard_url: str
    metrics_export_port: Optional[int]


def cluster_address(r: ResourcesConfig) -> str:
    """The address to join: config first, then $RAY_ADDRESS; empty means embedded."""
    return r.address or os.environ.get("RAY_ADDRESS", "")


def _probe(address: str, timeout_s: float) -> None:
    """TCP-connect to host:port of a Ray address; `auto`/`local` are left to Ray."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ConfigError(f"resources.address: {address!r} is not host:port — e.g. 10.0.0.1:6379 or ray://head:10001")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(
            f"resources.address: Ray at {host}:{port} did not answer within {timeout_s:.0f}s ({e.strerror or e}) — "
            "start it with `ray start --head`, fix the address, or leave it empty for an embedded Ray"
        ) from None


def _init_within(address: str, timeout_s: float, **kw: Any) -> Any:
    """`ray.init(address)`, or one line and exit code 2 after `timeout_s`.

    Against a port that accepts TCP but is not a Ray GCS, `ray.init` retries inside C++ for minutes
    and cannot be interrupted from Python, so a watchdog thread ends the process (nothing has been
    written yet: the run dir is created after connecting)."""
    import ray

    done = threading.Event()
    fix = "give the head's GCS address (HOST:6379, not the dashboard's 8265) or ray://HOST:10001"

    def watchdog() -> None:
        if not done.wait(timeout_s):
            print(f"e3rl: error: resources.address: {address} accepted a connection but no Ray cluster answered "
                  f"within {timeout_s:.0f}s — {fix}", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True, name="ray-connect-watchdog").start()
    try:
        return ray.init(address=address, **kw)
    except ConnectionError as e:
        raise ConfigError(f"resources.address: {address} is not a Ray cluster ({str(e).splitlines()[0]}) — {fix}") from None
    finally:
        done.set()


@contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """`ray.init` installs Ray's C++ fatal-signal handler for SIGTERM in the driver, which kills
    it on the spot: put ours back (the run's StopFlag: finish the step, checkpoint, exit 0)."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        yield
    finally:
        for s, h in saved.items():
            if h is not None:
                signal.signal(s, h)


def connect(cfg: Config) -> RayInfo:
    """Join the configured cluster or start an embedded one sized to this machine."""
    with _keep_signal_handlers():
        return _connect(cfg)


def _connect(cfg: Config) -> RayInfo:
    import ray

    r = cfg.resources
    address = cluster_address(r)
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("DS_ACCELERATOR"):
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    runtime_env = {"env_vars": env}
    if address:
        _probe(address, r.connect_timeout_s)
        info = _init_within(address, r.connect_timeout_s, runtime_env=runtime_env)
        embedded = False
    else:
        # Decide the auth mode explicitly: left unset, an embedded Ray writes a token file that
        # later breaks `ray start` / `ray job submit` on this machine.
        os.environ.setdefault("RAY_AUTH_MODE", r.auth_mode)
        kw = {}
        if r.metrics_export_port:
            kw["_metrics_export_port"] = r.metrics_export_port
        info = ray.init(
            address="local",
            num_cpus=r.embedded_cpus or os.cpu_count(),
            include_dashboard=True,
            dashboard_host=r.dashboard_host,
            runtime_env=runtime_env,
            **kw,
        )
        embedded = True
    ctx = ray.get_runtime_context()
    node = next((n for n in ray.nodes() if n.get("NodeID") == ctx.get_node_id()), {})
    return RayInfo(
        address=ctx.gcs_address,
        embedded=embedded,
        dashboard_url=getattr(info, "dashboard_url", "") or "",
        metrics_export_port=node.get("MetricsExportPort"),
    )


def check_resources(cfg: Config) -> None:
    """Refuse a run the cluster cannot place, naming the field to change."""
    import ray

    have = ray.cluster_resources()
    problem = resource_shortfall(cfg, have.get("CPU", 0.0), have.get("GPU", 0.0), "the cluster")
    if problem:
        raise ConfigError(problem)


def resource_shortfall(cfg: Config, cpu: float, gpu: float, where: str) -> str:
    """Why `cpu` CPUs and `gpu` GPUs cannot hold the run's actors ("" if they can), as a config error line."""
    r, l = cfg.resources, cfg.learner
    need_cpu = r.num_generators * r.cpus_per_generator + l.num_workers * r.cpus_per_learner
    need_gpu = r.num_generators * r.gpus_per_generator + l.num_workers * r.gpus_per_learner
    if need_gpu > gpu + 1e-9:
        return (f"resources.gpus_per_generator: the run needs {need_gpu:g} GPUs "
                f"({r.num_generators} generators x {r.gpus_per_generator:g} + {l.num_workers} learners x "
                f"{r.gpus_per_learner:g}) but {where} has {gpu:g} — lower them or add GPU nodes")
    if need_cpu > cpu + 1e-9:
        return (f"resources.cpus_per_generator: the run needs {need_cpu:g} CPUs "
                f"({r.num_generators} x {r.cpus_per_generator:g} + {l.num_workers} x {r.cpus_per_learner:g}) "
                f"but {where} has {cpu:g} — use fractional CPUs (e.g. 0.5) or fewer actors")
    return ""
