"""What a rehearsal must have exercised, read off the run dir it leaves: a rehearsal that ran but
moved no weight, erased nothing or never stopped a response would pass for a path it never took."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

TRUNCATED_FINISHES = ("gen/finish_length", "gen/finish_stream_cap")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    seen: str


def step_checks(steps: Sequence[dict], heal_active: bool) -> list[Check]:
    """The training steps' metrics: every step moved the weights, and the rollouts held an erase
    (when healing is on), a response ended by EOS and a response cut off by a length cap."""
    norms = [r.get("learner/grad_norm", float("nan")) for r in steps]
    out = [Check("gradient norm > 0 at every step", bool(norms) and all(math.isfinite(n) and n > 0 for n in norms),
                 ", ".join(f"{n:.3g}" for n in norms) or "no steps")]
    if heal_active:
        erased = sum(r.get("e3rl/segments_erased", 0.0) for r in steps)
        out.append(Check(">= 1 erased segment", erased >= 1, f"{erased:.0f} erased"))
    eos = sum(r.get("gen/finish_eos", 0.0) * r.get("gen/samples", 0.0) for r in steps)
    cut = sum(sum(r.get(k, 0.0) for k in TRUNCATED_FINISHES) * r.get("gen/samples", 0.0) for r in steps)
    out.append(Check(">= 1 response ended by EOS", eos >= 1, f"{eos:.0f} of {sum(r.get('gen/samples', 0) for r in steps):.0f}"))
    out.append(Check(">= 1 response cut off at a length cap", cut >= 1, f"{cut:.0f}"))
    return out


def run_dir_checks(out: Path, steps: int, architecture: str) -> list[Check]:
    """What the run dir holds after the resumed half: the steps, a checkpoint, the exported policy
    (of the configured architecture), evaluations before and after, and the report."""
    summary = json.loads((out / "summary.json").read_text())
    exported = out / "policy" / "config.json"
    archs = json.loads(exported.read_text()).get("architectures", []) if exported.is_file() else []
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    before, after = summary.get("accuracy_before", float("nan")), summary.get("accuracy_after", float("nan"))
    return [
        Check(f"{steps} steps, the last {summary.get('steps_this_session')} after a resume",
              summary.get("steps") == steps and 0 < summary.get("steps_this_session", 0) < steps,
              f"steps {summary.get('steps')}, this session {summary.get('steps_this_session')}"),
        Check("checkpoints written", bool(ckpts), ", ".join(ckpts) or "none"),
        Check(f"exported HF policy is a {architecture or 'causal LM'}",
              bool(archs) and (not architecture or architecture in archs), ", ".join(archs) or "none"),
        Check("evaluated before and after", math.isfinite(before) and math.isfinite(after),
              f"accuracy {before:.3f} -> {after:.3f}"),
        Check("report written", (out / "report.html").is_file() and (out / "report.html").stat().st_size > 0,
              str(out / "report.html")),
    ]
