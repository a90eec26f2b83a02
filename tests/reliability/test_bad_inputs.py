"""Every bad input is answered by the CLI (`python -m e3rl.run`) with exit code 2 and ONE last
stderr line `e3rl: error: <field>: <problem> — <fix>`, no traceback, and nothing half-written: the
output dir is not created (or, when it holds another run, left byte for byte as it was).

Cases marked `sub` run the real CLI in a subprocess, all started together (each is mostly
interpreter and import start-up); the others call `e3rl.run.main` in this process, after the
subprocesses are started, to spare a 5-10 s torch/transformers import each.
"""
from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.test_run_tiny import REPO, run_env

TINY = "configs/tiny.yaml"

# id -> (how, config file (or a fixture name in <>), overrides, field named by the error, words the line must contain)
CASES = {
    "invalid_yaml": ("sub", "<bad_yaml>", [], "config", ["not valid YAML at line"]),
    "missing_config_file": ("sub", "<missing_yaml>", [], "config", ["does not exist"]),
    "unknown_key": ("sub", TINY, ["algo.clip_hihg=0.3"], "algo.clip_hihg", ["unknown key", "algo.clip_high"]),
    "wrong_type": ("sub", TINY, ["gen.group_size=two"], "gen.group_size", ["expected an integer"]),
    "out_of_range": ("sub", TINY, ["gen.top_p=1.5"], "gen.top_p", ["must be in (0, 1]"]),
    "truncated_training_rollouts": ("main", TINY, ["gen.top_p=0.95"], "gen.top_p", ["truncated", "e3rl.eval"]),
    "missing_model_path": ("main", TINY, ["model.path=<missing>/model"], "model.path", ["does not exist"]),
    "not_a_causal_lm": ("sub", TINY, ["model.path=<bert>"], "model.path", ["BertModel", "not a causal LM"]),
    "encoder_decoder_config": ("main", TINY, ["model.path=<t5>"], "model.path", ["'t5'", "not a causal LM"]),
    "dir_without_model_config": ("main", TINY, ["model.path=<missing_parent>"], "model.path",
                                 ["no readable model config"]),
    "unknown_random_model_type": ("main", TINY, ["model.random_init.model_type=qwen99"], "model.random_init",
                                  ["qwen99"]),
    "missing_dataset": ("main", TINY, ["data.train=<missing>/train.jsonl", "data.train_size=0"], "data.train",
                        ["does not exist"]),
    "dataset_of_unknown_format": ("main", TINY, ["data.train=<no_columns>", "data.train_size=0"], "data.train",
                                  ["cannot detect the format", "['label', 'text']"]),
    "dataset_without_needed_columns": ("main", TINY, ["data.train=<no_columns>", "data.train_size=0",
                                                      "data.format=aime"], "data.train", ["missing columns"]),
    "empty_train_jsonl": ("sub", TINY, ["data.train=<empty_jsonl>", "data.train_size=0"], "data.train",
                          ["holds no rows", "at least one problem"]),
    "empty_train_parquet": ("sub", TINY, ["data.train=<empty_parquet>", "data.train_size=0"], "data.train",
                            ["holds no rows"]),
    "train_rows_all_filtered_out": ("sub", TINY, ["data.train=<aime_rows>", "data.train_size=0",
                                                  "data.max_prompt_tokens=1"], "data.train",
                                    ["3 of 3 filtered out", "data.max_prompt_tokens"]),
    "blank_eval_jsonl": ("sub", TINY, ["data.eval=[<blank_jsonl>]"], "data.eval", ["holds no rows"]),
    "missing_reward_fn": ("main", TINY, ["reward.fn=no_such_module:score"], "reward.fn", ["no module named"]),
    "unreachable_ray_address": ("sub", TINY, ["resources.address=127.0.0.1:9", "resources.connect_timeout_s=2"],
                                "resources.address", ["did not answer within 2s"]),
    "address_that_is_not_ray": ("sub", TINY, ["resources.address=127.0.0.1:<http_port>",
                                              "resources.connect_timeout_s=3"], "resources.address",
                                ["no Ray cluster answered within 3s", "6379"]),
    "unsatisfiable_resources": ("sub", TINY, ["resources.cpus_per_learner=64"], "resources.cpus_per_",
                                ["the run needs", "CPUs"]),
    "output_dir_holds_another_run": ("sub", TINY, ["algo.clip_high=0.5"], "run.output_dir",
                                     ["holds another run", "algo.clip_high"]),
}


def _fixtures(base: Path) -> dict[str, str]:
    """Bad files on disk: YAML with a syntax error, a BertModel dir, a T5 (encoder-decoder) config,
    a jsonl whose rows lack question/answer columns, jsonl/parquet files without rows, three
    AIME-format rows, and another run's output dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import BertConfig, BertModel, T5Config

    from e3rl.config import load_config
    from e3rl.rundir import prepare

    (base / "bad.yaml").write_text("model:\n  path: [unclosed\nrun:\n  steps: 2\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(base / "bert")
    T5Config(vocab_size=99, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2).save_pretrained(base / "t5")
    (base / "no_columns.jsonl").write_text("".join(json.dumps({"text": f"row {i}", "label": i}) + "\n" for i in range(4)))
    (base / "empty.jsonl").write_text("")
    (base / "blank_lines.jsonl").write_text("\n \n")
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   base / "empty.parquet")
    (base / "aime_rows.jsonl").write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)})
                                                  + "\n" for i in range(3)))
    prepare(load_config(REPO / TINY, [f"run.output_dir={base / 'other_run'}"]))  # another run's dir
    (base / "other_run" / "metrics.jsonl").write_text('{"step": 1}\n')
    return {"<bad_yaml>": str(base / "bad.yaml"), "<missing_yaml>": str(base / "nope.yaml"),
            "<missing>": str(base / "missing"), "<missing_parent>": str(base), "<bert>": str(base / "bert"), "<t5>": str(base / "t5"),
            "<no_columns>": str(base / "no_columns.jsonl"), "<empty_jsonl>": str(base / "empty.jsonl"),
            "<blank_jsonl>": str(base / "blank_lines.jsonl"), "<empty_parquet>": str(base / "empty.parquet"),
            "<aime_rows>": str(base / "aime_rows.jsonl")}


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _argv(case: str, base: Path, subs: dict[str, str]) -> tuple[list[str], Path]:
    _, config, overrides, _, _ = CASES[case]
    out = base / "other_run" if case == "output_dir_holds_another_run" else base / f"out_{case}"
    args = [subs.get(config, config)]
    for o in overrides:
        for k, v in subs.items():
            o = o.replace(k, v)
        args.append(o)
    return [*args, f"run.output_dir={out}"], out


def _subprocess(argv: list[str]) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "e3rl.run", *argv], cwd=REPO, env=run_env(), capture_output=True,
                       text=True, timeout=240)
    return dict(rc=p.returncode, stderr=p.stderr, seconds=time.time() - t0, ended=time.time())


def _in_process(argv: list[str]) -> dict:
    from e3rl.run import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # main installs its own
    err = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)  # an uncaught exception (a traceback) fails the test right here
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return dict(rc=rc, stderr=err.getvalue(), seconds=time.time() - t0)


@pytest.fixture(scope="module")
def http_port():
    """A port that accepts TCP and answers HTTP 404, as a dashboard given instead of the GCS port would."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _selected_cases(request) -> set[str]:
    """Cases of this module's tests selected in the session, so `-k` runs only those."""
    params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
              if getattr(item, "module", None) is request.module]
    return {p["case"] for p in params if "case" in p}


@pytest.fixture(scope="module")
def answers(request, tmp_path_factory, http_port):
    base = tmp_path_factory.mktemp("bad_inputs")
    subs = _fixtures(base) | {"<http_port>": str(http_port)}
    other_before = _snapshot(base / "other_run")
    selected = _selected_cases(request)
    argvs = {case: _argv(case, base, subs) for case in CASES if case in selected}
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        futures = {case: pool.submit(_subprocess, argv) for case, (argv, _) in argvs.items() if CASES[case][0] == "sub"}
        results = {case: _in_process(argv) for case, (argv, _) in argvs.items() if CASES[case][0] == "main"}
        results |= {case: f.result() for case, f in futures.items()}
    for case, (_, out) in argvs.items():
        results[case]["out"] = out
    return {"results": results, "other_before": other_before}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(answers, case):
    _, _, _, field, words = CASES[case]
    r = answers["results"][case]
    tail = r["stderr"].rstrip("\n").splitlines()[-1] if r["stderr"].strip() else ""
    context = f"rc={r['rc']}\n--- stderr tail:\n{r['stderr'][-3000:]}"
    assert r["rc"] == 2, context
    assert "Traceback" not in r["stderr"], context
    assert tail.startswith(f"e3rl: error: {field}"), context
    assert " — " in tail, context  # the fix
    for w in words:
        assert w in tail, context
    # nothing half-written
    if case == "output_dir_holds_another_run":
        assert _snapshot(r["out"]) == answers["other_before"]
    else:
        assert not r["out"].exists(), sorted(p.name for p in r["out"].iterdir())


def _connect_seconds(r: dict) -> float:
    """From the log line written just before connecting (`e3rl: data: ...`) to the process's end."""
    from datetime import datetime

    line = next(line for line in r["stderr"].splitlines() if " e3rl: data: " in line)
    return r["ended"] - datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


# the configured timeout, plus importing Ray (a few seconds on this loaded 2-core machine)
@pytest.mark.parametrize("case,limit", [("unreachable_ray_address", 2 + 10), ("address_that_is_not_ray", 3 + 10)])
def test_bad_address_is_answered_in_seconds(answers, case, limit):
    r = answers["results"][case]
    s = _connect_seconds(r)
    print(f"{case}: answered {s:.1f} s after connecting began ({r['seconds']:.1f} s for the whole CLI)")
    assert s < limit, s
