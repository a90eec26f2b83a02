import time

import pytest

from e3rl.config import ConfigError, load_config
from e3rl.ray_setup import _probe, check_resources
from e3rl.rundir import prepare


def test_run_dir_saves_config_and_refuses_another_run(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [f"run.output_dir={out}"])
    prepare(cfg)
    assert (out / "config.yaml").is_file()
    prepare(load_config(None, [f"run.output_dir={out}", "run.steps=99"]))  # same run, longer: resumable
    with pytest.raises(ConfigError, match=r"run.output_dir: .* holds another run \(it differs in algo.clip_high\)"):
        prepare(load_config(None, [f"run.output_dir={out}", "algo.clip_high=0.5"]))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty and holds no e3rl run"):
        prepare(load_config(None, [f"run.output_dir={tmp_path / 'junk'}"]))


def test_unreachable_ray_address_is_answered_in_seconds():
    t = time.time()
    with pytest.raises(ConfigError, match=r"resources.address: Ray at 127.0.0.1:9 did not answer"):
        _probe("127.0.0.1:9", timeout_s=2)
    with pytest.raises(ConfigError, match="is not host:port"):
        _probe("nonsense", timeout_s=2)
    assert time.time() - t < 5


def test_resources_the_cluster_lacks_are_refused(ray_session):
    cfg = load_config(None, ["resources.gpus_per_generator=1"])
    with pytest.raises(ConfigError, match=r"resources.gpus_per_generator: the run needs 1 GPUs .* cluster has 0"):
        check_resources(cfg)
    cfg = load_config(None, ["resources.num_generators=8", "resources.cpus_per_generator=1"])
    with pytest.raises(ConfigError, match=r"resources.cpus_per_generator: the run needs 9 CPUs"):
        check_resources(cfg)
    check_resources(load_config(None, ["resources.cpus_per_generator=0.5", "resources.cpus_per_learner=0.5"]))
