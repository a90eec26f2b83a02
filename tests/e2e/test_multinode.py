"""Multi-node placement on one machine: a `ray.cluster_utils.Cluster` of two nodes, each with a
custom resource (`gen_node`, `learn_node`), and a run through `e3rl.run.main` that pins the roles
with `resources.generator_resources` / `resources.learner_resources` and joins the cluster with
`resources.address`.

The cluster and the run live in a subprocess (one Ray per process; the test session's shared Ray
is left alone). Weights must cross nodes through the object store every step: with a large
learning rate one update moves the policy far, so generator behaviour log-probs agreeing with the
learner's (logp_diff) at step 2 shows the generator node sampled with the synced version-1 weights.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import ray
import ray._common.utils
import ray._private.utils
from ray.cluster_utils import Cluster

# Cluster writes, and on shutdown deletes, /tmp/ray/ray_current_cluster: that file may belong to
# someone else's `ray start` on this machine. We connect by explicit address and need neither.
ray._private.utils.write_ray_address = lambda *a, **k: None
ray._common.utils.reset_ray_address = lambda *a, **k: None

out, temp_dir = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, resources={"learn_node": 1},
                                                            include_dashboard=False, temp_dir=temp_dir))
try:
    cluster.add_node(num_cpus=1, resources={"gen_node": 1}, temp_dir=temp_dir)
    cluster.wait_for_nodes()
    from e3rl.run import main

    rc = main(["configs/tiny.yaml", f"run.output_dir={out}", "run.steps=2", "learner.lr=0.01", "data.eval=[]",
               f"resources.address={cluster.address}", "resources.generator_resources={gen_node: 1}",
               "resources.learner_resources={learn_node: 1}", "reward.fn=tests.e2e.test_run_tiny:length_reward",
               "learner.dtype=float32"])  # fp32 like the generator: synced weights must reproduce its log-probs
    from ray._private.state import actors

    table = [{"cls": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
             for a in actors().values()]
    nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
    print("E3RL_RESULT " + json.dumps({"rc": rc, "actors": table, "nodes": nodes}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_roles_pinned_to_different_nodes(tmp_path):
    out = tmp_path / "mn_run"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    temp_dir = tempfile.mkdtemp(prefix="e3mn", dir="/tmp")  # own Ray temp dir; short (socket path limit)
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), temp_dir], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("E3RL_RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:] + proc.stderr[-5000:])
    res = json.loads(lines[-1].split(" ", 1)[1])
    assert res["rc"] == 0

    nodes = {n["id"]: n for n in res["nodes"] if n["alive"]}
    assert len(nodes) == 2
    gen_node = next(i for i, n in nodes.items() if "gen_node" in n["resources"])
    learn_node = next(i for i, n in nodes.items() if "learn_node" in n["resources"])
    assert gen_node != learn_node

    def where(cls: str) -> set[str]:
        return {a["node"] for a in res["actors"] if a["cls"] == cls}

    assert where("GeneratorWorker") == {gen_node}, res["actors"]
    assert where("LearnerRank") == {learn_node}, res["actors"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "gen/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["sync/policy_version"] for r in steps] == [1.0, 2.0]
    assert all(r["learner/grad_norm"] > 0 and r["learner/skipped"] == 0.0 for r in steps)
    # step 2 was sampled on the generator node with the version-1 weights from the learner node
    assert steps[1]["learner/logp_diff_mean"] < 1e-3, steps[1]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and s["samples"] == 16

    # lr 0.01: the updates are big (measured: 2 updates move the log-prob of random tokens by ~0.8
    # nats on average), so a generator node serving stale weights could not have passed the check above
    import torch
    from transformers import AutoModelForCausalLM

    from e3rl.config import load_config
    from e3rl.models import load_model

    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.output_dir={out}"])
    init = load_model(cfg.model, seed=cfg.run.seed).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "policy", dtype=torch.float32).state_dict()
    assert max(float((init[k] - trained[k]).abs().max()) for k in init) > 5e-3
