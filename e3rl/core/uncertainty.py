"""Composite segment uncertainty: one number per closed segment, from its tokens' surprisal.

U = w_mean * mean(s) + w_peak * max(movavg_w(s)) + w_delta * relu(mean(s) - prev) / (mean(s) + prev)

- mean: the segment's average surprisal (its local cross-entropy);
- peak: the maximum of the window-smoothed surprisal. A raw maximum is dominated by single rare
  tokens (a digit, a name) that are not defects; a run of w surprised tokens is;
- delta: the relative *rise* over the previous kept segment's mean. A drop in uncertainty is
  not evidence of a defect, so it is clipped at 0. The first segment has no delta. It is relative
  to the sum of the two means, so it lies in [0, 1]: a rise over `prev` alone is unbounded as
  prev -> 0 (0.02 -> 0.6 would add 29 x w_delta), and since a regeneration inherits `prev`, such
  a segment would be erased again and again until its budget ran out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class UncertaintyWeights:
    mean: float = 1.0
    peak: float = 0.5
    delta: float = 0.5
    window: int = 4


def moving_average(s: torch.Tensor, window: int) -> torch.Tensor:
    """Means of every length-`window` run of s; [L] -> [max(L - window + 1, 1)]."""
    s = s.float()
    if s.numel() <= window:
        return s.mean().reshape(1)
    c = torch.cat([s.new_zeros(1), s.cumsum(0)])
    return (c[window:] - c[:-window]) / window


def uncertainty_components(s: torch.Tensor, prev_mean: Optional[float], window: int) -> tuple[float, float, float]:
    """(mean, peak, delta) of a segment's surprisal s [L] (L >= 1)."""
    mean = float(s.float().mean())
    peak = float(moving_average(s, window).max())
    delta = 0.0
    if prev_mean is not None:
        rise, scale = max(0.0, mean - prev_mean), mean + prev_mean
        delta = rise / scale if scale > 0 else 0.0
    return mean, peak, delta


def segment_uncertainty(s: torch.Tensor, prev_mean: Optional[float], w: UncertaintyWeights) -> float:
    """Composite uncertainty of one segment. s: [L] surprisal of its tokens."""
    mean, peak, delta = uncertainty_components(s, prev_mean, w.window)
    return w.mean * mean + w.peak * peak + w.delta * delta
