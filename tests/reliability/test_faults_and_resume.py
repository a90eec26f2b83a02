"""Faults survived, nothing lost: real CLI runs (`python -m e3rl.run`, subprocesses), compared with an
uninterrupted reference run of the same config and seed.

- reference: 3 steps, 2 generator actors, a checkpoint every step, the `length_reward` test reward
  (non-zero advantages, so every step moves the weights);
- generator fault: the same with `run.fault.generator_die_after=3` — each generator actor exits at
  its fourth batch (the held-out eval before training, plain then healed, step 1, then step 2):
  both die mid-rollout in step 2;
- the generator fault on the vLLM backend: the same accounting, not bit equality (README);
- a sync fault, in the last session of the interrupted run below (it costs no run of its own):
  `run.fault.generator_die_in_sync=1` — both generator actors exit in the middle of the weight
  sync after that session's first step, after their first bucket (2 MB buckets; the model is
  12.9 MB), their models half-updated: the learner's broadcast fails instead of hanging, the group
  is re-formed with the restarted actors, and the run still ends as the reference;
- one run interrupted three ways in a row: SIGTERM (finish the step, checkpoint, exit 0), then
  resumed and killed with SIGKILL after a checkpoint, then given a torn newer checkpoint (`latest`
  pointing at it) and resumed to the end (with the sync fault above).

Rollouts are reseeded per step and shard, the data cursor and threshold history are checkpointed,
and DeepSpeed's checkpoint round-trips exactly, so the recovered and the resumed runs must equal the
reference bit for bit: same per-step rewards and losses, same final weights.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_run_tiny import REPO, REWARD_FN, run_env, step_rows

STEPS, SAMPLES_PER_STEP = 3, 2 * 4  # configs/tiny.yaml: prompts_per_step x group_size
SYNC_FAULT = ("run.fault.generator_die_in_sync=1", "resources.sync_bucket_mb=2", "resources.sync_timeout_s=30")
COMMON = (f"run.steps={STEPS}", "run.save_every=1", f"reward.fn={REWARD_FN}", "resources.num_generators=2",
          "resources.cpus_per_generator=0.5", "run.report=false", "run.trace_every=0")


def start_run(out: Path, *overrides: str, log_name: str = "") -> tuple[subprocess.Popen, Path]:
    """`python -m e3rl.run configs/tiny.yaml` into `out`; each session of a run gets its own log."""
    log = out.parent / f"{log_name or out.name}.log"
    cmd = [sys.executable, "-m", "e3rl.run", "configs/tiny.yaml", f"run.output_dir={out}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    return proc, log


def _wait(proc, what: str, pred, log: Path, timeout: float = 240) -> None:
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"run exited (rc={proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.1)


def _finish(proc, log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except Exception:
        proc.kill()
        proc.wait()
        raise AssertionError(f"run timed out:\n{log.read_text()[-3000:]}")


def _logged_steps(out: Path) -> list[int]:
    try:
        return [r["step"] for r in step_rows(out)]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _complete_steps(out: Path) -> list[int]:
    from learner import checkpoint as ckpt

    return [int(d.name.split("_")[1]) for d in ckpt.complete_checkpoints(out / "checkpoints")]


def _family(pid: int) -> list:
    """The process and all its descendants (psutil handles: a reused pid is not mistaken for them)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _alive(family: list) -> list[int]:
    import psutil

    alive = []
    for p in family:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _tear_newer_checkpoint(root: Path) -> tuple[int, int]:
    """A copy of the newest checkpoint as the next step, one file torn, `latest` pointing at it.
    -> (newest complete step, torn step)."""
    from learner import checkpoint as ckpt

    good = ckpt.latest_checkpoint(root)
    step = int(good.name.split("_")[1])
    torn = ckpt.step_dir(root, step + 1)
    shutil.rmtree(torn, ignore_errors=True)
    shutil.copytree(good, torn)
    shard = sorted((torn / ckpt.TAG).glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    (root / ckpt.LATEST).write_text(torn.name)
    return step, step + 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability_runs")
    t0 = time.time()
    ref, ref_log = start_run(base / "ref", *COMMON)
    fault, fault_log = start_run(base / "fault", *COMMON, "run.fault.generator_die_after=3")
    vllm, vllm_log = start_run(base / "fault_vllm", *COMMON, "run.fault.generator_die_after=3", "gen.backend=vllm",
                               "gen.vllm.kv_cache_gib=0.25")
    out = base / "resumed"
    info: dict = {"base": base, "ref": base / "ref", "fault": base / "fault", "fault_vllm": base / "fault_vllm",
                  "resumed": out}

    # session 1: SIGTERM once step 1 is logged; it finishes the step it is in, checkpoints, exits 0
    s1, log1 = start_run(out, *COMMON, log_name="session1")
    _wait(s1, "step 1", lambda: 1 in _logged_steps(out), log1)
    s1.send_signal(signal.SIGTERM)
    info["sigterm_rc"], info["sigterm_log"] = _finish(s1, log1), log1
    info["sigterm_summary"] = json.loads((out / "summary.json").read_text())
    info["sigterm_checkpoints"] = _complete_steps(out)
    info["sigterm_has_policy"] = (out / "policy").exists()

    # session 2: resumes; SIGKILL (no handler runs) as soon as it wrote a checkpoint of its own
    s2, log2 = start_run(out, *COMMON, log_name="session2")
    first = max(info["sigterm_checkpoints"])
    _wait(s2, "a checkpoint after the resume", lambda: max(_complete_steps(out), default=0) > first, log2)
    family = _family(s2.pid)
    s2.kill()
    info["kill_rc"], info["kill_log"] = s2.wait(), log2
    info["killed_after"] = _complete_steps(out)
    t_kill = time.time()

    # session 3: a torn newer checkpoint that `latest` points at must lose to the newest complete one
    info["newest_complete"], info["torn_step"] = _tear_newer_checkpoint(out / "checkpoints")
    s3, log3 = start_run(out, *COMMON, *SYNC_FAULT, log_name="session3")
    info["final_rc"], info["final_log"] = _finish(s3, log3), log3

    for name, (proc, log) in {"ref": (ref, ref_log), "fault": (fault, fault_log),
                              "fault_vllm": (vllm, vllm_log)}.items():
        info[f"{name}_rc"], info[f"{name}_log"] = _finish(proc, log), log
    # Ray's agents watch their raylet and exit within a minute or so of it (measured ~40-60 s)
    while _alive(family) and time.time() - t_kill < 120:
        time.sleep(1)
    info["left_alive"], info["left_alive_after_s"] = _alive(family), time.time() - t_kill
    print(f"reliability runs: {time.time() - t0:.0f} s")
    yield info
    for pid in info["left_alive"]:  # only processes our killed run started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((out / "policy").glob("*.safetensors"))
    assert files, f"no exported policy in {out}"
    state = {}
    for f in files:
        state |= load_file(f)
    return state


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _by_step(out: Path) -> dict[int, dict]:
    rows = step_rows(out)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {r["step"]: r for r in rows}


def _assert_accounting(out: Path) -> None:
    rows = _by_step(out)
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, r in rows.items():
        assert r["gen/samples"] == SAMPLES_PER_STEP and r["learner/seqs"] == SAMPLES_PER_STEP, (step, r)
        assert r["learner/skipped"] == 0.0 and r["learner/version"] == step
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == STEPS and s["samples"] == STEPS * SAMPLES_PER_STEP


def _assert_same_trajectory(out: Path, ref: Path) -> None:
    """Per step: the same rollouts (reward, kept length, rewinds) and the same learner numbers."""
    a, b = _by_step(out), _by_step(ref)
    keys = ("gen/reward_mean", "gen/kept_len_mean", "e3rl/rewinds_per_sample", "learner/loss", "learner/grad_norm",
            "learner/tokens")
    for step in b:
        assert {k: a[step][k] for k in keys} == {k: b[step][k] for k in keys}, step


def test_reference_run_completes(runs):
    assert runs["ref_rc"] == 0, runs["ref_log"].read_text()[-3000:]
    assert "(dashboard 127.0.0.1:" in runs["ref_log"].read_text()  # the embedded dashboard binds to localhost
    _assert_accounting(runs["ref"])
    rows = _by_step(runs["ref"])
    assert all(r["gen/recovered_shards"] == 0 for r in rows.values())
    assert all(r["learner/grad_norm"] > 0 for r in rows.values())  # every step moves the weights


def test_dead_generators_are_restarted_and_their_shards_regenerated_exactly(runs):
    out = runs["fault"]
    log = runs["fault_log"].read_text()
    assert runs["fault_rc"] == 0, log[-3000:]
    assert log.count("died mid-rollout") == 2, log[-3000:]  # both actors, once each
    rows = _by_step(out)
    assert [rows[s]["gen/recovered_shards"] for s in sorted(rows)] == [0.0, 2.0, 2.0]  # cumulative
    _assert_accounting(out)  # every prompt generated once and trained once: 8 trajectories per step
    _assert_same_trajectory(out, runs["ref"])
    assert _max_diff(_weights(out), _weights(runs["ref"])) == 0.0


def test_dead_vllm_generators_are_restarted_and_no_prompt_is_lost_or_repeated(runs):
    """The vLLM backend's promise (README, "When things go wrong"): the same accounting as HF —
    every prompt generated and trained once per step — but not bit-identical samples (vLLM is not
    batch-invariant), so the trajectory is not compared with the reference."""
    out = runs["fault_vllm"]
    log = runs["fault_vllm_log"].read_text()
    assert runs["fault_vllm_rc"] == 0, log[-3000:]
    assert log.count("died mid-rollout") == 2, log[-3000:]
    rows = _by_step(out)
    assert [rows[s]["gen/recovered_shards"] for s in sorted(rows)] == [0.0, 2.0, 2.0]
    _assert_accounting(out)
    assert json.loads((out / "summary.json").read_text())["gen_backend"] == "vllm"


def test_generators_dying_mid_sync_rejoin_and_get_the_current_weights(runs):
    """Both generators exit halfway through the collective sync after the last session's first
    step. The learner's broadcast fails (no hang: the session finishes), the group is re-formed
    once with the restarted actors (no object-store fallback), and they sample the next step with
    the current policy: `test_resumed_run_equals_the_uninterrupted_one` holds through it."""
    log = runs["final_log"].read_text()
    assert runs["final_rc"] == 0, log[-3000:]
    assert log.count("failed; re-forming the group") == 1, log[-3000:]
    rows = _by_step(runs["resumed"])
    first = runs["newest_complete"] + 1  # the session's first step: its row carries the sync after it
    assert rows[first]["sync/retries"] == 1.0
    assert all(r["sync/retries"] == 0.0 for step, r in rows.items() if step != first)
    assert all(r["sync/collective"] == 1.0 for r in rows.values())


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(runs):
    log = runs["sigterm_log"].read_text()
    assert runs["sigterm_rc"] == 0, log[-3000:]
    assert "signal 15: stopping after this step" in log
    s = runs["sigterm_summary"]
    assert 1 <= s["steps"] < STEPS and s["steps_this_session"] == s["steps"]
    assert s["samples"] == s["steps"] * SAMPLES_PER_STEP
    assert max(runs["sigterm_checkpoints"]) == s["steps"]  # the step it finished is checkpointed
    assert not runs["sigterm_has_policy"]  # an interrupted run exports nothing


def test_sigkill_then_resume_from_newest_complete_checkpoint(runs):
    assert runs["kill_rc"] == -signal.SIGKILL
    first = runs["sigterm_summary"]["steps"]
    log2 = runs["kill_log"].read_text()
    assert f"resumed from step {first} " in log2
    assert max(runs["killed_after"]) > first
    # the killed driver's embedded Ray (GCS, raylet, actors) went down with it
    assert runs["left_alive"] == [], f"left alive {runs['left_alive_after_s']:.0f} s after the kill: {runs['left_alive']}"

    final = runs["final_log"].read_text()
    assert runs["final_rc"] == 0, final[-3000:]
    n = runs["newest_complete"]
    assert n < STEPS  # the kill came mid-run: the last session had steps to redo
    assert f"resumed from step {n} " in final  # not from the torn step `latest` pointed at
    s = json.loads((runs["resumed"] / "summary.json").read_text())
    assert s["steps_this_session"] == STEPS - n
    _assert_accounting(runs["resumed"])  # every step logged exactly once across the three sessions


def test_resumed_run_equals_the_uninterrupted_one(runs):
    assert runs["final_rc"] == 0 and runs["ref_rc"] == 0
    _assert_same_trajectory(runs["resumed"], runs["ref"])
    diff = _max_diff(_weights(runs["resumed"]), _weights(runs["ref"]))
    print(f"max |w_resumed - w_uninterrupted| = {diff:g}")
    assert diff == 0.0
