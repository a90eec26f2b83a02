"""`python -m e3rl.experiment` end to end on the tiny model: GRPO vs E3RL Erase@1, 2 steps, one seed,
both runs at once. Checks the table, the curves, the experiment page and each run's report.html,
and that re-running the command reuses finished runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.e2e.test_run_tiny import REPO, REWARD_FN, run_env

ARGS = ["configs/tiny.yaml", "run.steps=2", f"reward.fn={REWARD_FN}", "heal.threshold_k=0",
        "heal.history_weight=0", "--seeds", "1", "--variants", "grpo,erase1", "--eval-every", "1", "--parallel", "2",
        "--drop-checkpoints"]


def experiment(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "e3rl.experiment", *(args or ARGS), "--out", str(out)], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    t = time.time()
    p = experiment(out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(f"tiny experiment in {time.time() - t:.0f} s")
    return out, p.stdout


def test_table_compares_variants_at_equal_samples(exp):
    out, stdout = exp
    res = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"grpo", "erase1"}
    assert rows["grpo"]["samples"] == rows["erase1"]["samples"] == 2 * 2 * 4  # steps x prompts x G
    assert rows["grpo"]["rewinds_per_sample"][0] == 0.0
    assert 0.0 < rows["erase1"]["rewinds_per_sample"][0] <= 1.0  # forced healing, budget of one erase
    assert rows["erase1"]["tokens_per_sample"][0] > 0
    for r in rows.values():
        assert r["peak_kv_mb"][0] > 0 and r["wall_s_per_sample"][0] > 0
        assert 0 <= r["accuracy_after"][0] <= 1
    for v in ("grpo", "erase1"):  # the table's numbers are the runs' own
        s = json.loads((out / v / "seed0" / "summary.json").read_text())
        assert rows[v]["accuracy_after"][0] == pytest.approx(s["accuracy_after"])
        assert rows[v]["tokens_per_sample"][0] == pytest.approx(s["tokens_per_sample"])
    md = (out / "results.md").read_text()
    assert "| GRPO (no healing) | 1 | 16 |" in md and "| E³RL Erase@1 | 1 | 16 |" in md
    assert md in stdout + "\n"


def test_curves_and_experiment_page(exp):
    out, _ = exp
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    page = (out / "experiment.html").read_text()
    assert "data:image/png;base64," in page
    assert "href='grpo/seed0/report.html'" in page and "href='erase1/seed0/report.html'" in page


def test_each_run_has_its_report_and_traces(exp):
    out, _ = exp
    for v in ("grpo", "erase1"):
        run = out / v / "seed0"
        page = (run / "report.html").read_text()
        for anchor in ("summary", "reward", "rewinds", "phases", "uncertainty", "threshold", "entropy", "samples"):
            assert f"<h2 id={anchor}>" in page, (v, anchor)
        assert page.count("data:image/png;base64,") == 6
        assert sorted(p.name for p in (run / "traces").iterdir()) == ["step_000001.arrow", "step_000002.arrow"]
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert sum("eval/accuracy" in r for r in rows) == 3  # before, after step 1, after step 2
        cfg = (run / "config.yaml").read_text()
        assert "eval_heal: plain" in cfg and "seed: 0" in cfg
        assert (run / "policy" / "config.json").is_file() and not (run / "checkpoints").exists()  # --drop-checkpoints
    # erased segments are shown struck through only where healing ran
    assert "<del title=" in (out / "erase1" / "seed0" / "report.html").read_text()
    assert "<del title=" not in (out / "grpo" / "seed0" / "report.html").read_text()


def test_rerun_reuses_finished_runs(exp):
    out, _ = exp
    t = time.time()
    p = experiment(out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 runs, 2 already done" in p.stdout
    assert time.time() - t < 60


def test_train_study_pairs_seeds_and_agrees_with_eval(exp, tmp_path):
    """`python -m e3rl.study train` over the experiment: each final policy's held-out Avg@k, plain
    and healed at test time, equals `e3rl.eval`'s for that policy with the same set, k and seeds;
    the comparison is the paired difference. Seed 1 is seed 0's run again (linked), so the per-seed differences are equal."""
    out, _ = exp
    two = tmp_path / "two_seeds"
    for v in ("grpo", "erase1"):
        (two / v).mkdir(parents=True)
        for s in (0, 1):
            (two / v / f"seed{s}").symlink_to(out / v / "seed0", target_is_directory=True)
    res_path, ref_path = tmp_path / "train.json", tmp_path / "ref.json"
    p = subprocess.run([sys.executable, "-m", "e3rl.study", "train", "--experiment", str(two), "--size", "4",
                        "--k", "2", "--test-time-heal", "--temperature", "0.5", "--out", str(res_path)], cwd=REPO,
                       env=run_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(res_path.read_text())
    c = res["comparisons"]["erase1:grpo"]["avg@k"]
    assert c["seeds"] == [0, 1] and c["per_seed"][0] == c["per_seed"][1] and c["seed_sd"] == 0.0
    diff = res["variants"]["erase1"]["avg"] - res["variants"]["grpo"]["avg"]
    assert c["difference"]["mean"] == pytest.approx(diff) and c["per_seed"][0] == pytest.approx(diff)
    assert res["comparisons"]["erase1:grpo"]["token_ratio"] > 1.0  # erased tokens count
    for v, temperature in (("grpo", []), ("erase1", []), ("grpo", ["gen.temperature=0.5"])):
        run = res["per_run"][v]["0"]
        assert run["tokens_generated"] > 0 and run["entropy_first"] > 0
        ref = subprocess.run([sys.executable, "-m", "e3rl.eval", "--model", str(out / v / "seed0" / "policy"),
                              "--data", "gym:chain_sum", "--size", "4", "--k", "2", "--heal", "both",
                              "--out", str(ref_path), "data.seed=0", "run.seed=0", *temperature],
                             cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=400)
        assert ref.returncode == 0, ref.stderr[-3000:]
        expected = json.loads(ref_path.read_text())["results"]
        name = v + ("@T0.5" if temperature else "")  # --temperature 0.5: the same policy sampled colder
        assert res["variants"][name]["avg"] == pytest.approx(expected["off"]["gym:chain_sum"]["avg@2"])
        assert res["variants"][name + "+heal"]["avg"] == pytest.approx(expected["on"]["gym:chain_sum"]["avg@2"])
    assert {"grpo+heal:grpo", "erase1+heal:grpo+heal", "erase1+heal:grpo"} <= set(res["comparisons"])
    assert "erase1:grpo: avg@k" in p.stdout
    # each run left a record; with the runs gone, the records alone give the same analysis
    records = two / "records"
    assert sorted(f.relative_to(records).as_posix() for f in records.glob("*/*.json")) == [
        "erase1/seed0.json", "erase1/seed1.json", "grpo/seed0.json", "grpo/seed1.json"]
    kept = json.loads((records / "grpo" / "seed0.json").read_text())["evals"]
    assert sorted(kept) == ["healed", "healed@T0.5", "plain", "plain@T0.5"] and kept["plain@T0.5"]["temperature"] == 0.5
    for v in ("grpo", "erase1"):
        shutil.rmtree(two / v)
    again = tmp_path / "again.json"
    p = subprocess.run([sys.executable, "-m", "e3rl.study", "train", "--records", str(records), "--size", "4",
                        "--k", "2", "--test-time-heal", "--temperature", "0.5", "--out", str(again)], cwd=REPO,
                       env=run_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads(again.read_text())["comparisons"] == res["comparisons"]


def test_grpo_at_e3rls_tokens_stops_at_the_first_step_that_reaches_them(tmp_path):
    """`grpo_eqtok` takes the tokens Erase@5 generated on the same seed (erased ones count) as its
    budget: it trains past Erase@5's 2 steps until its own generated tokens reach that, and stops
    at the first step that does (its cap: 2 + 16 steps)."""
    p = experiment(tmp_path, *ARGS[:ARGS.index("--seeds")], "--seeds", "1", "--variants", "erase5,grpo_eqtok",
                   "--eval-every", "0", "--parallel", "2", "--drop-checkpoints")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tokens = {}
    for v in ("erase5", "grpo_eqtok"):
        run = tmp_path / v / "seed0"
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "gen/reward_mean" in x]
        tokens[v] = [r["gen/tokens_produced"] for r in steps]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["complete"] and summary["tokens_generated"] == sum(tokens[v])
    budget = sum(tokens["erase5"])
    assert len(tokens["erase5"]) == 2 and f"token_budget: {int(budget)}" in (
        tmp_path / "grpo_eqtok" / "seed0" / "config.yaml").read_text()
    got = tokens["grpo_eqtok"]
    assert sum(got) >= budget and (sum(got[:-1]) < budget or len(got) == 18)
    assert len(got) > 2  # GRPO, not healing, spends fewer tokens per step: it needs more steps
