"""`python -m e3rl.eval` in-process on the shared Ray: the tiny model over a fixture file and a gym
task, self-healing on and off; JSON structure, Pass@k consistency, rewinds, one-line errors.

The generator actors import `coin_reward` below by name, so (like the rest of the suite) run
pytest from the repository root: Ray puts the driver's working directory on the workers' path.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import zlib
from pathlib import Path

import pytest

from tests.workloads.processes import reward_workers

ROOT = Path(__file__).resolve().parents[2]
K = 4
AGGRESSIVE = ["heal.threshold_k=0", "heal.penalty_scale=0"]  # erase every segment above the group mean


def coin_reward(response: str, problem) -> float:
    """A deterministic ~1/3 'correct' rate, so Pass@k is not trivially 0 for a random model."""
    return float(zlib.crc32(response.encode()) % 3 == 0)


def _run(argv: list[str], cli: str = "e3rl.eval") -> tuple[int, str, str]:
    main = importlib.import_module(cli).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def both(ray_session, fixtures_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "res.json"
    data = [str(fixtures_dir / "aime2024_sample.jsonl"), "gym:chain_sum"]
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--data", data[0], "--data", data[1], "--size", "2",
            "--k", str(K), "--heal", "both", "--out", str(path), "reward.fn=tests.workloads.test_eval_cli:coin_reward",
            *AGGRESSIVE]
    rc, stdout, stderr = _run(argv)
    assert rc == 0, stderr
    return json.loads(path.read_text()), stdout, data


def test_json_structure_and_table(both):
    res, stdout, data = both
    assert res["k"] == K and res["ks"] == [1, 2, 4] and res["heal"] == "both"
    assert res["problems"] == {data[0]: 2, data[1]: 2}
    assert set(res["results"]) == {"on", "off"} and set(res["seconds"]) == {"on", "off"}
    for mode in ("on", "off"):
        for bench in data:
            m = res["results"][mode][bench]
            assert {"avg@4", "pass@1", "pass@2", "pass@4", "rewinds_per_sample", "n_problems"} <= set(m)
            assert m["samples"] == 2 * K and m["n_problems"] == 2
    for bench in data:
        for key, d in res["delta"][bench].items():
            assert d == pytest.approx(res["results"]["on"][bench][key] - res["results"]["off"][bench][key])
    lines = stdout.splitlines()
    assert lines[0].split()[:5] == ["benchmark", "heal", "n", "avg@4", "pass@1"]
    assert sum(line.split()[0:1] == [data[0]] for line in lines) == 1 and any(" delta " in line for line in lines)


def test_pass_at_k_is_consistent(both):
    res, _, data = both
    values = []
    for mode in ("on", "off"):
        for bench in data:
            m = res["results"][mode][bench]
            assert abs(m["pass@1"] - m[f"avg@{K}"]) <= 1e-9  # same samples: unbiased pass@1 == mean accuracy
            ks = [m[f"pass@{k}"] for k in res["ks"]]
            assert ks == sorted(ks) and all(0.0 <= v <= 1.0 for v in ks + [m[f"avg@{K}"]])
            values += ks
    assert any(0.0 < v < 1.0 for v in values), "the coin reward never scored: is the repo root the cwd?"


def test_heal_on_rewinds_and_heal_off_does_not(both):
    res, _, data = both
    for bench in data:
        assert res["results"]["on"][bench]["rewinds_per_sample"] > 0
        assert res["results"]["off"][bench]["rewinds_per_sample"] == 0


def test_heal_both_runs_on_the_vllm_backend(ray_session, fixtures_dir, tmp_path):
    path = tmp_path / "res.json"
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--data", "gym:chain_sum", "--size", "2", "--k", str(K),
            "--heal", "both", "--out", str(path), "gen.backend=vllm", "gen.vllm.kv_cache_gib=0.25", *AGGRESSIVE]
    rc, _, stderr = _run(argv)
    assert rc == 0, stderr
    res = json.loads(path.read_text())["results"]
    assert res["on"]["gym:chain_sum"]["rewinds_per_sample"] > 0
    assert res["off"]["gym:chain_sum"]["rewinds_per_sample"] == 0
    assert res["on"]["gym:chain_sum"]["samples"] == res["off"]["gym:chain_sum"]["samples"] == 2 * K


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_eval_sampling_settings_reach_the_generators(both, backend, ray_session, fixtures_dir, tmp_path):
    """`eval.*` is how evaluation samples, on both engines: greedy (`eval.temperature=0`) makes a
    problem's k samples one answer, so Avg@k == Pass@k (all or none) where T = 1 (the `both` run)
    spreads them. On vLLM the engine is built for evaluation's setting too (heal.surprisal_under=
    policy with a reshaped eval distribution needs the policy's log-probs), and healed evaluation
    runs on it (greedy peers are identical, so nothing is erased there)."""
    res1, _, data = both
    assert any(abs(res1["results"]["off"][b][f"avg@{K}"] - res1["results"]["off"][b][f"pass@{K}"]) > 1e-9 for b in data)
    path = tmp_path / "res.json"
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--data", data[0], "--data", data[1], "--size", "2",
            "--k", str(K), "--heal", "both", "--out", str(path), "reward.fn=tests.workloads.test_eval_cli:coin_reward",
            f"gen.backend={backend}", "gen.vllm.kv_cache_gib=0.25", "eval.temperature=0", "eval.top_k=5", *AGGRESSIVE]
    rc, _, stderr = _run(argv)
    assert rc == 0, stderr
    res = json.loads(path.read_text())["results"]
    for bench in data:
        m = res["off"][bench]
        assert m[f"avg@{K}"] == pytest.approx(m[f"pass@{K}"]) and m[f"avg@{K}"] in (0.0, 0.5, 1.0)
    assert all(res["on"][b]["samples"] == 2 * K for b in data)  # healed evaluation ran on the same engine


def test_eval_sampling_is_its_own_section():
    from e3rl.config import ConfigError, load_config

    cfg = load_config(ROOT / "configs/qwen3-4b-e3rl.yaml")
    assert (cfg.gen.temperature, cfg.gen.top_p, cfg.gen.top_k) == (1.0, 1.0, 0)  # training: the untruncated policy
    assert (cfg.eval_gen.temperature, cfg.eval_gen.top_p, cfg.eval_gen.top_k) == (0.6, 0.95, 20)  # the card's
    assert load_config(None).eval_gen == load_config(None).gen  # unset: evaluation samples as training does
    with pytest.raises(ConfigError, match=r"^eval\.top_p: "):
        load_config(None, ["eval.top_p=1.5"])


def test_model_dir_uses_its_tokenizer_and_the_runs_config(tmp_path):
    from e3rl.config import load_config, save_config
    from e3rl.eval import build_config, parse_args

    save_config(load_config(ROOT / "configs/tiny.yaml", ["gen.max_new_tokens=17"]), tmp_path / "config.yaml")
    (tmp_path / "policy").mkdir()
    cfg = build_config(parse_args(["--model", str(tmp_path / "policy"), "--data", "gym:chain_sum", "gen.top_k=5"]))
    assert cfg.model.path == str(tmp_path / "policy") and cfg.model.tokenizer == ""
    assert cfg.gen.max_new_tokens == 17 and cfg.gen.top_k == 5  # the run's settings, then the overrides


@pytest.mark.parametrize("args,message", [
    (["--data", "nope.jsonl"], "--data: dataset file 'nope.jsonl' does not exist"),
    (["--data", "gym:chain_sum", "--k", "0"], "--k: must be >= 1, got 0"),
    (["--data", "gym:chain_sum", "--k", "two"], "argument --k: invalid int value"),
    (["--data", "gym:chain_sum", "algo.clip_hihg=0.3"], "algo.clip_hihg: unknown key — did you mean `algo.clip_high`?"),
    (["--data", "gym:chain_sum", "--heal", "maybe"], "argument --heal: invalid choice"),
    ([], "--data: no benchmark given"),
    (["--data", "gym:chain_sum", "--model", "/no/such/dir"], "--model: '/no/such/dir' is not a directory"),
    (["--data", "gym:chain_sum", "--config", "no/such.yaml"], "--config: file 'no/such.yaml' does not exist"),
    (["--data", "gym:chain_sum", "--size", "0", "--config", str(ROOT / "configs/tiny.yaml")],
     "--size: gym:chain_sum is generated and needs a size"),
    (["--data", "gym:chain_sum", "--size", "1", "--config", str(ROOT / "configs/qwen3-4b-e3rl.yaml")],
     "model.path: '/models/Qwen3-4B' does not exist"),  # the paper config loads; the missing model is a run-time error
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    rc, stdout, stderr = _run(args)
    assert rc == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and " — " in lines[0], stderr


@pytest.mark.parametrize("args,message", [
    ([], "name a study — python -m e3rl.study heal"),
    (["heal", "--bogus"], "unrecognized arguments: --bogus — see `python -m e3rl.study heal --help`"),
    (["heal", "--branches", "0"], "--branches / --max-events: must be >= 1 / >= 0"),
    (["heal", "--k", "0"], "--k: must be >= 1, got 0"),
    (["heal", "--model", "/no/such/dir"], "--model: '/no/such/dir' is not a directory"),
])
def test_study_bad_input_is_one_line_and_exit_2(args, message):
    rc, stdout, stderr = _run(args, "e3rl.study")
    assert rc == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("e3rl.study: error: "), stderr


def test_eval_decoding_settings_load_on_a_vllm_config():
    """The Qwen3 configs generate on vLLM; the README's eval decoding (T = 0.6, top-p, top-k) makes
    vLLM's one log-prob per token the policy's, which a training run must declare
    (`algo.behaviour_logp`). Evaluation trains nothing, so it declares it itself."""
    from e3rl.eval import build_config, parse_args

    cfg = build_config(parse_args(["--config", str(ROOT / "configs/qwen3-4b-e3rl.yaml"), "--data", "gym:chain_sum",
                                   "gen.temperature=0.6", "gen.top_p=0.95", "gen.top_k=20"]))
    assert cfg.gen.backend == "vllm" and cfg.gen.temperature == 0.6 and cfg.algo.behaviour_logp == "recompute"


def test_heal_study_agrees_with_eval_and_continues_erasures(both, tmp_path):
    """`python -m e3rl.study heal` on the same config, task, size, k and seed as the eval above
    draws the same healed and plain samples (its accuracies equal `e3rl.eval`'s), gives plain
    sampling the tokens healing spent, and continues the erased and replacement branches."""
    from e3rl.study import main

    res_eval, _, data = both
    path = tmp_path / "study.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["heal", "--config", str(ROOT / "configs/tiny.yaml"), "--data", "gym:chain_sum", "--size", "2",
                   "--k", str(K), "--branches", "2", "--max-events", "4", "--out", str(path),
                   "reward.fn=tests.workloads.test_eval_cli:coin_reward", *AGGRESSIVE])
    assert rc == 0, err.getvalue()
    assert reward_workers() == []  # the study's scorer is closed: no worker outlives it
    res = json.loads(path.read_text())
    on, off = res_eval["results"]["on"]["gym:chain_sum"], res_eval["results"]["off"]["gym:chain_sum"]
    acc = res["accuracy"]
    assert acc["healed_avg@k"] == pytest.approx(on[f"avg@{K}"]) and acc["plain_avg@k"] == pytest.approx(off[f"avg@{K}"])
    assert acc["healed_pass@k"] == pytest.approx(on[f"pass@{K}"])
    assert res["rewinds_per_sample"] == pytest.approx(on["rewinds_per_sample"])
    # healing erased tokens, so plain sampling got more samples, and Pass@ over a superset cannot drop
    assert res["tokens_per_sample"]["healed"] > res["tokens_per_sample"]["plain"]
    assert res["plain_samples_at_equal_tokens"] > K
    assert acc["plain_pass@equal_tokens"] >= acc["plain_pass@k"]
    assert res["difference"]["avg@k"]["mean"] == pytest.approx(acc["healed_avg@k"] - acc["plain_avg@k"])
    b = res["branches"]
    assert b["erasures"] > 0 and b["continued"] == min(4, b["erasures"]) and b["continuations_each"] == 2
    assert 0.0 <= b["p_right_replacement"] <= 1.0 and 0.0 <= b["p_right_erased"] <= 1.0
    assert "P(right | replacement) - P(right | erased)" in out.getvalue()
