"""Checkpoint directory protocol (no DeepSpeed): temp dir + rename, COMPLETE marker with sizes,
atomic `latest`, keep-last-N, truncated or unfinished checkpoints ignored."""
from pathlib import Path

import pytest

from learner import checkpoint as ckpt


class FakeEngine:
    """Writes/reads files where DeepSpeed would (dir/tag/...)."""

    def __init__(self, value: int = 0):
        self.value = value

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "model_states.pt").write_bytes(bytes([self.value % 256]) * 1000)

    def load_checkpoint(self, load_dir, tag, **kw):
        self.value = (Path(load_dir) / tag / "model_states.pt").read_bytes()[0]
        return load_dir, {}


def _save(root, step, keep=2):
    return ckpt.save_engine(FakeEngine(step), root, step, {"step": step, "version": step}, keep, 0, lambda: None)


def test_save_publishes_complete_dirs_and_prunes(tmp_path):
    for step in (1, 2, 3):
        d = _save(tmp_path, step)
        assert d == ckpt.step_dir(tmp_path, step) and ckpt.is_complete(d)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000003"
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".*.tmp"))
    eng = FakeEngine()
    assert ckpt.load_engine(eng, ckpt.latest_checkpoint(tmp_path))["step"] == 3 and eng.value == 3


@pytest.mark.parametrize("damage", ["truncate", "drop_marker", "delete_file"])
def test_damaged_newest_checkpoint_loses_to_the_previous(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    victim = newest / ckpt.TAG / "model_states.pt"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:10])
    elif damage == "drop_marker":
        (newest / ckpt.COMPLETE).unlink()
    else:
        victim.unlink()
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="incomplete or truncated"):
        ckpt.load_engine(FakeEngine(), newest)


def test_unfinished_save_is_invisible_and_cleaned(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    _save(tmp_path, 1)
    ckpt.prepare_save(tmp_path, 2)
    FakeEngine(2).save_checkpoint(ckpt.temp_dir(tmp_path, 2), ckpt.TAG)  # crash before finish_save
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 1)
    _save(tmp_path, 3)
    assert not ckpt.temp_dir(tmp_path, 2).exists()
