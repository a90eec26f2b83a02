"""`python -m e3rl.run CONFIG --rehearse` end to end, as a user runs it, on the flagship
(qwen3-4b-e3rl: Qwen3 architecture, DeepMath/AIME schemas, vLLM with healing, 2 + 2 actors,
collective sync, bf16 where the CPU has it) and on DAPO (dynamic sampling, overlong shaping, 16
mini-batches). Both start together to share the wall clock (each is mostly actor start-up). The
rehearsal's own end-of-run checks must pass, and this test re-reads the run dir independently."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from e3rl.metrics import read_metrics
from e3rl.traces import read_traces
from tests.e2e.test_run_tiny import REPO, run_env

CONFIGS = ("qwen3-4b-e3rl", "qwen3-4b-dapo")


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsals")
    # both configs rehearse the same stand-ins: write them once, before two processes race to
    from e3rl.config import load_config
    from e3rl.models import cache_root
    from e3rl.rehearsal.plan import Machine, rehearsal_config
    from e3rl.rehearsal.standins import write_stand_ins

    write_stand_ins(rehearsal_config(load_config(REPO / "configs" / f"{CONFIGS[0]}.yaml"), Machine.detect(), cache_root())[2])
    procs = {}
    for name in CONFIGS:
        log = root / f"{name}.log"
        cmd = [sys.executable, "-m", "e3rl.run", f"configs/{name}.yaml", f"run.output_dir={root / name}", "--rehearse"]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT), log)
    out = {}
    for name, (proc, log) in procs.items():
        try:
            proc.wait(timeout=1500)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = log.read_text(errors="replace")
        assert proc.returncode == 0, f"{name} rehearsal failed (rc={proc.returncode}):\n{text[-5000:]}"
        out[name] = (root / f"{name}-rehearsal", text)
    return out


def _common(run_dir: Path, text: str, written: dict) -> tuple[list[dict], dict]:
    assert "e3rl rehearsal passed" in text and "FAILED" not in text
    for field in ("model.path", "gen.max_new_tokens", "heal.segment_tokens", "learner.num_workers", "reward.rehearsal"):
        assert field in text.split("e3rl rehearsal passed")[0], f"{field} missing from the printed plan"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["reward"]["rehearsal"] is True  # labelled in the run's own record
    assert (cfg["gen"]["max_new_tokens"], cfg["heal"]["segment_tokens"], cfg["gen"]["vllm"]["block_size"]) == (1024, 64, 32)
    assert (cfg["resources"]["num_generators"], cfg["learner"]["num_workers"]) == (2, 2)
    for section in ("algo", "heal"):  # the algorithm as written
        for k in ("clip_low", "clip_high", "loss_agg", "tis_cap", "e3rl", "dynamic_sampling", "threshold_k",
                  "max_erases_per_traj"):
            if k in written[section]:
                assert cfg[section][k] == written[section][k], f"{section}.{k}"
    steps, evals = read_metrics(run_dir)
    assert [r["step"] for r in steps] == [1, 2] and len(evals) >= 2
    assert all(math.isfinite(r["learner/grad_norm"]) and r["learner/grad_norm"] > 0 for r in steps)
    assert all(0 <= r["reward/verified_accuracy"] <= 1 for r in steps)  # the real verifier ran
    ends = {int(t.stream_ids[-1]) for ts in read_traces(run_dir).values() for t in ts if t.finish_reason == "eos"}
    assert ends and ends <= {0, 2}, f"EOS rows end with {ends}"  # <|endoftext|> / <|im_end|> of the stand-in
    return steps, cfg


def _written(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())


def test_flagship_rehearsal(rehearsals):
    run_dir, text = rehearsals["qwen3-4b-e3rl"]
    steps, cfg = _common(run_dir, text, _written("qwen3-4b-e3rl"))
    assert sum(r["e3rl/segments_erased"] for r in steps) >= 1
    assert sum(r["gen/rewind_requests"] for r in steps) >= 1  # vLLM resubmitted erased prefixes
    assert all(r["learner/updates"] == 1 for r in steps)  # one optimizer step per step, as written
    assert any(r.get("gen/finish_length", 0) + r.get("gen/finish_stream_cap", 0) > 0 for r in steps)


def test_dapo_rehearsal(rehearsals):
    run_dir, text = rehearsals["qwen3-4b-dapo"]
    steps, cfg = _common(run_dir, text, _written("qwen3-4b-dapo"))
    assert all(r["learner/updates"] == 16 for r in steps)  # DAPO's 16 mini-batches, kept
    assert all(r["dynamic/kept_groups"] >= 1 for r in steps)  # the coin gives mixed groups: no endless refill
    assert any(r["reward/overlong_penalty"] < 0 for r in steps)  # cut-off responses were punished (a negative mean)
    assert "e3rl/segments_erased" not in steps[0] or sum(r["e3rl/segments_erased"] for r in steps) == 0
