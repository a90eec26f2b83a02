"""The cluster path, exactly as the README shows it: `ray start --head` + `ray job submit
--working-dir .` of `python -m e3rl.run configs/tiny.yaml`, then the run's Ray gauges on the
Prometheus endpoint (`--metrics-export-port`).

Also `python -m e3rl.experiment --ray-address`: its runs submitted as concurrent jobs to the same head.

The head runs with `--block` as our child process, on free ports and its own `--temp-dir`, and is
stopped by signalling that process (its shutdown hook stops the node's processes). `ray stop
--force` is deliberately not used: it kills every Ray process on the machine, including other
people's clusters and this test run's own shared Ray session.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]))  # the job's `python` is this venv's
    return env


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def gauges(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value} for the ray_e3rl_* series (last sample wins)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("ray_e3rl_"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture(scope="module")
def head():
    # short temp dir: Ray's unix socket paths must stay under ~107 characters
    tmp = Path(tempfile.mkdtemp(prefix="e3rj", dir="/tmp"))
    gcs, dash, metrics, client, agent = free_ports(5)
    cmd = [RAY, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", "--include-dashboard=true",
           f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"]
    log = open(tmp / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
            try:
                if "ray_version" in http_get(f"http://127.0.0.1:{dash}/api/version", timeout=2):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "ray head did not come up in 90 s"
            time.sleep(1)
        yield dict(tmp=tmp, dash=dash, metrics=metrics, proc=proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # --block: stops this node's Ray processes
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the process group we created
                proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_job_submit_runs_and_exports_gauges(head, tmp_path):
    out = tmp_path / "job_run"
    addr = f"http://127.0.0.1:{head['dash']}"
    sid = f"e3rl-e2e-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", addr, "--submission-id", sid, "--working-dir", str(REPO), "--no-wait",
         "--", "python", "-m", "e3rl.run", "configs/tiny.yaml", f"run.output_dir={out}", "run.steps=2"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    # the upload is small: .gitignore (runs/, .venv/, *.egg-info/) and Ray's defaults (.git) are honoured
    upload = [line for line in (submit.stdout + submit.stderr).splitlines() if "Uploading package" in line]
    assert upload, submit.stdout + submit.stderr

    status, seen = "", {}
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            seen |= gauges(http_get(f"http://127.0.0.1:{head['metrics']}/metrics"))
        except OSError:
            pass
        status = json.loads(http_get(f"{addr}/api/jobs/{sid}"))["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = json.loads(http_get(f"{addr}/api/jobs/{sid}/logs"))["logs"]
    assert status == "SUCCEEDED", logs[-4000:]
    assert "e3rl: done" in logs

    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and s["samples"] == 2 * 2 * 4
    assert (out / "policy" / "model.safetensors").is_file()

    # gauges reach the endpoint a few seconds after they are set and stay ~20 s after the driver exits
    # (measured on Ray 2.60), so they are scraped while the job runs (above) and right after it
    deadline = time.time() + 45
    while seen.get("ray_e3rl_sync_policy_version") != 2.0 and time.time() < deadline:
        time.sleep(2)
        try:
            seen |= gauges(http_get(f"http://127.0.0.1:{head['metrics']}/metrics"))
        except OSError:
            pass
    assert "ray_e3rl_gen_reward_mean" in seen, sorted(seen)
    assert seen["ray_e3rl_sync_policy_version"] == 2.0  # the last step's value
    assert seen["ray_e3rl_gen_reward_mean"] == pytest.approx(s["reward_last"])
    assert {"ray_e3rl_e3rl_rewinds_per_sample", "ray_e3rl_time_train_s", "ray_e3rl_buffer_fill"} <= set(seen)

    # what was uploaded: the code and configs, not runs/ (53 MB here) or .git
    pkgs = [p for p in (head["tmp"] / "ray" / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
            if p.is_dir()]
    assert len(pkgs) == 1
    names = {p.name for p in pkgs[0].iterdir()}
    assert {"e3rl", "actors", "learner", "configs"} <= names
    assert not names & {"runs", ".git", ".venv", "e3rl.egg-info", ".pytest_cache"}
    size = sum(f.stat().st_size for f in pkgs[0].rglob("*") if f.is_file())
    assert size < 5 * 2**20, f"working dir upload is {size / 2**20:.1f} MiB"


def test_experiment_runs_as_ray_jobs(head, tmp_path):
    """Two tiny runs (GRPO, Erase@1) submitted together as jobs; the table is built from their run dirs."""
    out = tmp_path / "exp"
    p = subprocess.run(
        [sys.executable, "-m", "e3rl.experiment", "configs/tiny.yaml", "run.steps=1", "--seeds", "1",
         "--variants", "grpo,erase1", "--out", str(out), "--ray-address", f"http://127.0.0.1:{head['dash']}"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"grpo", "erase1"} and rows["grpo"]["samples"] == rows["erase1"]["samples"] == 8
    for v in rows:
        assert (out / v / "seed0" / "report.html").is_file() and (out / v / "seed0" / "policy").is_dir()
    jobs = json.loads(http_get(f"http://127.0.0.1:{head['dash']}/api/jobs/"))
    entrypoints = [j["entrypoint"] for j in jobs if "e3rl.run" in j["entrypoint"] and str(out) in j["entrypoint"]]
    assert len(entrypoints) == 2 and all(j["status"] == "SUCCEEDED" for j in jobs if j["entrypoint"] in entrypoints)
