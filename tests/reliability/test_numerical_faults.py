"""Numerical faults through the real CLI: a non-finite loss skips the optimizer step (weights and
optimizer state untouched, logged and counted); `run.max_skipped_steps` of them in a row stop the
run with one line and exit code 3, writing no further steps.

The NaN is injected honestly and deterministically with `run.fault.nan_loss_after=1`: the learner
multiplies its loss by NaN from its second optimizer step on (as a diverged policy or a NaN reward
would), so ZeRO-3 sees a non-finite gradient norm and skips the step.
"""
from __future__ import annotations

import json

import pytest

from tests.e2e.test_run_tiny import REWARD_FN, start_run, step_rows


@pytest.fixture(scope="module")
def halted(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan") / "run"
    proc, log = start_run(out, "run.steps=6", "run.save_every=1", f"reward.fn={REWARD_FN}", "data.eval=[]",
                          "run.fault.nan_loss_after=1", "run.max_skipped_steps=2", "run.report=false",
                          "run.trace_every=0")
    try:
        proc.wait(timeout=300)
    finally:
        proc.kill()
    return {"out": out, "rc": proc.returncode, "log": log.read_text()}


def test_nonfinite_step_is_skipped_logged_and_counted(halted):
    rows = {r["step"]: r for r in step_rows(halted["out"])}
    assert sorted(rows) == [1, 2], halted["log"][-3000:]  # step 3 was the second skip in a row: never logged
    ok, bad = rows[1], rows[2]
    assert ok["learner/skipped"] == 0 and ok["learner/nonfinite_loss"] == 0 and ok["learner/version"] == 1
    assert bad["learner/skipped"] == 1 and bad["learner/nonfinite_loss"] >= 1 and bad["learner/skipped_steps"] == 1
    assert bad["learner/version"] == 1 and bad["sync/policy_version"] == 1  # no new policy was published
    assert bad["gen/samples"] == 8 and bad["learner/seqs"] == 8  # the batch was generated and seen, not applied


def test_skipped_step_left_weights_and_optimizer_untouched(halted):
    from learner import checkpoint as ckpt

    root = halted["out"] / "checkpoints"
    assert [d.name for d in ckpt.complete_checkpoints(root)] == ["step_00000001", "step_00000002"]

    def states(step: int) -> dict:
        d = ckpt.step_dir(root, step) / ckpt.TAG
        return ckpt.weights_only_load(str(next(d.glob("*optim_states.pt"))))["optimizer_state_dict"]

    one, two = states(1), states(2)
    import torch

    flat1, flat2 = one["fp32_flat_groups"], two["fp32_flat_groups"]
    assert len(flat1) == len(flat2) >= 1 and all(torch.equal(a, b) for a, b in zip(flat1, flat2))  # fp32 master weights
    adam1, adam2 = one["optimizer_state_dict"]["state"], two["optimizer_state_dict"]["state"]
    for k in adam1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(adam1[k][name]), torch.as_tensor(adam2[k][name])), (k, name)
    assert json.loads((ckpt.step_dir(root, 2) / ckpt.META).read_text())["skipped_steps"] == 1


def test_repeated_nonfinite_steps_stop_the_run_with_one_line(halted):
    assert halted["rc"] == 3, halted["log"][-3000:]
    last = halted["log"].rstrip("\n").splitlines()[-1]
    assert last == ("e3rl: error: learner: 2 consecutive optimizer steps skipped as non-finite (loss=nan); weights "
                    "are those of policy version 1 — lower learner.lr, check the reward and data, or raise "
                    "run.max_skipped_steps"), halted["log"][-3000:]
    assert "Traceback" not in halted["log"]
    assert not (halted["out"] / "summary.json").exists() and not (halted["out"] / "policy").exists()
