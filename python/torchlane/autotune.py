"""Online bucket-size autotuning for ``torchlane.DistributedDataParallel(bucket_cap_mb="auto")``.

During the first synchronised steps the model tries several bucket caps, then several sizes of
the first (early-launched) bucket, timing each for a few steps; every rank takes the slowest rank's
time of each try (one all-reduce per try), so all ranks settle on the same setting, and the
buckets are re-planned once more to the winner. Design: docs/autotune.md; the C++ side is Note
[Bucket cap autotuning] in csrc/reducer/reducer.cpp.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_log = logging.getLogger("torchlane.autotune")
_MiB = 1024 * 1024


def _check_positive_mb(name, values):
    if isinstance(values, (int, float)):
        values = (values,)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"BucketAutotune {name} must hold numbers (MiB), got {v!r}")
        if not (v > 0 and math.isfinite(v)) or v >= 2**40:
            raise ValueError(f"BucketAutotune {name} must hold finite numbers > 0 MiB, got {v}")
        out.append(float(v))
    if not out:
        raise ValueError(f"BucketAutotune {name} must not be empty")
    return tuple(out)


@dataclass(frozen=True)
class BucketAutotune:
    """Settings of the bucket-cap search; ``bucket_cap_mb="auto"`` uses the defaults.

    candidates_mb: bucket caps tried (MiB), in order. first_bucket_candidates_mb: sizes of the
    first bucket tried with the best cap (those not above it). warmup_steps: steps after each
    re-plan that are not timed (the first one allocates the new buffers). steps_per_trial: timed
    steps per try; the try's time is the median of these on each rank, then the maximum over
    ranks. timer: a zero-argument clock in seconds (tests inject one)."""

    candidates_mb: tuple = (1.0, 4.0, 10.0, 25.0, 50.0, 100.0)
    first_bucket_candidates_mb: tuple = (0.25, 1.0, 4.0)
    warmup_steps: int = 1
    steps_per_trial: int = 5
    timer: object = field(default=time.perf_counter, compare=False)

    def __post_init__(self):
        object.__setattr__(
            self, "candidates_mb", _check_positive_mb("candidates_mb", self.candidates_mb)
        )
        object.__setattr__(
            self,
            "first_bucket_candidates_mb",
            _check_positive_mb("first_bucket_candidates_mb", self.first_bucket_candidates_mb),
        )
        for name in ("warmup_steps", "steps_per_trial"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"BucketAutotune {name} must be an int, got {v!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"BucketAutotune warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.steps_per_trial < 1:
            raise ValueError(
                f"BucketAutotune steps_per_trial must be >= 1, got {self.steps_per_trial}"
            )
        if not callable(self.timer):
            raise TypeError(f"BucketAutotune timer must be callable, got {self.timer!r}")

    def agreement_key(self):
        """What must be equal on every rank (the timer may differ)."""
        return (
            self.candidates_mb,
            self.first_bucket_candidates_mb,
            self.warmup_steps,
            self.steps_per_trial,
        )


class _Autotuner:
    """Drives the search from DistributedDataParallel.forward (synchronised steps only).

    The step time of a try is the interval between the starts of consecutive synchronised
    forwards: it covers forward, backward with its overlapped all-reduces, the optimizer step and
    data loading, i.e. what the bucket cap can change end to end."""

    def __init__(
        self, config: BucketAutotune, reducer, process_group, device, first_cap_default_mb
    ):
        self.config = config
        self._reducer = reducer  # the C++ reducer: set_bucket_caps() and buckets()
        self._group = process_group
        self._device = device
        self.trials: list[dict] = []
        self.done = False
        self.chosen: tuple[float, float] | None = None
        # The queue of (cap, first cap) settings to try; the first-bucket phase is queued once the
        # cap phase has a winner.
        self._queue = [(c, min(first_cap_default_mb, c)) for c in config.candidates_mb]
        self._phase = "cap"
        self._current = None
        self._samples: list[float] = []
        self._steps_in_trial = 0
        self._last_start = None
        self._layouts: dict[tuple, int] = {}  # bucket layout -> index of the try that timed it

    def set_reducer(self, reducer):
        self._reducer = reducer

    def _layout(self):
        return tuple(tuple(b["param_indices"]) for b in self._reducer.buckets())

    def _apply(self, caps_mb):
        self._reducer.set_bucket_caps(*caps_bytes(caps_mb))

    def state(self) -> dict:
        return {
            "state": "done" if self.done else "tuning",
            "bucket_cap_mb": self.chosen[0] if self.chosen else None,
            "first_bucket_cap_mb": self.chosen[1] if self.chosen else None,
            "trials": [dict(t) for t in self.trials],
        }

    def pause(self) -> None:
        """The next interval is not a step of the current try (join(), the first step)."""
        self._last_start = None

    def current_caps_mb(self) -> tuple[float, float]:
        if self.done:
            return self.chosen
        return self._current if self._current is not None else (None, None)

    def on_synced_forward(self) -> None:
        """Called at the start of each synchronised forward, on every rank, before the backward
        is prepared; re-plans the buckets when a try ends."""
        if self.done:
            return
        now = self.config.timer()
        if self._current is None:  # the first call: start the first try
            self._last_start = now
            self._start_next()
            return
        if self._last_start is None:  # after a pause
            self._last_start = now
            return
        interval = now - self._last_start
        self._last_start = now
        self._steps_in_trial += 1
        if self._steps_in_trial > self.config.warmup_steps:
            self._samples.append(interval)
        if len(self._samples) < self.config.steps_per_trial:
            return
        self._finish_trial()
        self._start_next()

    def _finish_trial(self):
        local = statistics.median(self._samples)
        t = torch.tensor([local], dtype=torch.float64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        cap, first = self._current
        self._layouts[self._layout()] = len(self.trials)
        trial = {
            "bucket_cap_mb": cap,
            "first_bucket_cap_mb": first,
            "num_buckets": len(self._reducer.buckets()),
            "step_ms": float(t.item()) * 1e3,
            "local_step_ms": local * 1e3,
            "phase": self._phase,
        }
        self.trials.append(trial)
        _log.info(
            "bucket autotune: cap %.3g MiB, first bucket %.3g MiB, %d buckets: %.2f ms/step",
            cap,
            first,
            trial["num_buckets"],
            trial["step_ms"],
        )

    def _best(self):
        # Ties (and reused layouts) go to the earliest try, the same one on every rank.
        best = min(self.trials, key=lambda t: t["step_ms"])
        return best["bucket_cap_mb"], best["first_bucket_cap_mb"]

    def _start_next(self):
        while True:
            if not self._queue and self._phase == "cap":
                cap, _ = self._best()
                tried = {(t["bucket_cap_mb"], t["first_bucket_cap_mb"]) for t in self.trials}
                self._phase = "first_bucket"
                self._queue = [
                    (cap, f)
                    for f in self.config.first_bucket_candidates_mb
                    if f <= cap and (cap, f) not in tried
                ]
            if not self._queue:
                self.done = True
                self.chosen = self._best()
                self._current = None
                self._apply(self.chosen)
                _log.info(
                    "bucket autotune: settled on cap %.3g MiB, first bucket %.3g MiB after %d tries",
                    self.chosen[0],
                    self.chosen[1],
                    len(self.trials),
                )
                return
            nxt = self._queue.pop(0)
            self._apply(nxt)
            same = self._layouts.get(self._layout())
            if same is not None:  # these caps cut the same buckets as an earlier try: reuse it
                timed = self.trials[same]
                self.trials.append(
                    {
                        **timed,
                        "bucket_cap_mb": nxt[0],
                        "first_bucket_cap_mb": nxt[1],
                        "phase": self._phase,
                        "same_as": same,
                    }
                )
                continue
            self._current = nxt
            self._samples = []
            self._steps_in_trial = 0
            return


def caps_bytes(caps_mb: tuple[float, float]) -> tuple[int, int]:
    cap, first = caps_mb
    return max(1, int(cap * _MiB)), max(1, int(first * _MiB))
