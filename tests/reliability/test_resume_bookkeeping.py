"""A resumed run redoes the steps after its checkpoint; the rows the lost session logged for them go,
so metrics.jsonl holds every step exactly once (the loop logs a step before checkpointing it)."""
import json

from e3rl.metrics import MetricsLogger, drop_rows_after


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_after_the_resumed_step_are_dropped_and_a_torn_line_too(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval/accuracy": 0.5}, {"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 2},
             {"step": 3, "x": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "x"')  # killed mid-write
    assert drop_rows_after(path, 2) == 2  # step 3 and the torn line
    assert _rows(path) == lines[:4]
    assert drop_rows_after(tmp_path / "absent.jsonl", 0) == 0


def test_logger_of_a_resumed_session_continues_after_the_checkpointed_step(tmp_path):
    first = MetricsLogger(tmp_path, steps=4, progress=False, use_ray=False)
    for step in (1, 2, 3):  # step 3 logged, then the driver died before its checkpoint
        first.log(step, {"x": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, steps=4, progress=False, use_ray=False, resumed_step=2)
    for step in (3, 4):
        resumed.log(step, {"x": 10.0 * step})
    resumed.close()
    assert [(r["step"], r["x"]) for r in _rows(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
