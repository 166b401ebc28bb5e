"""A backend="auto" decision: the spec chosen for one problem key, why, and every candidate's outcome; and the
rule that picks it from the timings.

The rule: the fastest verified candidate by median, except that PyTorch's own convolutions (the reference) stay
unless a kernel candidate is at least MIN_GAIN faster: a kernel that merely ties, within timing noise, is not
worth its risk.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field, replace
from typing import Optional

from resaspp_ops.autotune.candidates import REFERENCE
from resaspp_ops.autotune.key import ProblemKey

MIN_GAIN = 0.05

# Trial statuses.
CHOSEN, SLOWER, WRONG, RAISED = "chosen", "slower", "wrong", "raised"
# Where a decision came from.
MEASURED, CACHE, RANK0, STATIC = "measured", "cache file", "rank 0", "static order"


@dataclass(frozen=True)
class Trial:
    """One candidate's outcome for a key: status (chosen, slower, wrong, raised), its median time when it was
    timed, and its verification (each result's error against its bound) or the exception it raised."""

    candidate: str
    status: str
    median_ms: Optional[float]
    detail: str

    def as_dict(self) -> dict:
        return {"candidate": self.candidate, "status": self.status, "median_ms": self.median_ms,
                "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        ms = d["median_ms"]
        return cls(str(d["candidate"]), str(d["status"]), None if ms is None else float(ms), str(d["detail"]))


@dataclass(frozen=True)
class Decision:
    """The spec `chosen` for `key`, why (reason), where the decision came from (source: measured, cache file,
    rank 0, static order), when it was measured, and every candidate's trial (none for the static order)."""

    key: ProblemKey
    chosen: str
    reason: str
    source: str
    trials: tuple = field(default_factory=tuple)
    measured_at: str = ""

    def summary(self) -> str:
        """Which candidate won, by how much, and why the others did not (the tuning report's line)."""
        head = f"{self.key.text()}: {self.chosen} ({self.reason}; {self.source})"
        others = [f"{t.candidate} {t.status}" + (f" {t.median_ms:.3g} ms" if t.median_ms is not None else "")
                  + (f": {t.detail}" if t.status in (WRONG, RAISED) else "")
                  for t in self.trials if t.candidate != self.chosen]
        return head + ("; " + "; ".join(others) if others else "")

    def as_dict(self) -> dict:
        return {"key": self.key.as_dict(), "chosen": self.chosen, "reason": self.reason, "source": self.source,
                "trials": [t.as_dict() for t in self.trials], "measured_at": self.measured_at}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        """KeyError / TypeError / ValueError for a malformed record."""
        return cls(ProblemKey.from_dict(d["key"]), str(d["chosen"]), str(d["reason"]), str(d["source"]),
                   tuple(Trial.from_dict(t) for t in d["trials"]), str(d.get("measured_at", "")))

    def with_source(self, source: str) -> "Decision":
        return replace(self, source=source)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def pick(medians: dict[str, float], min_gain: float = MIN_GAIN) -> tuple[str, str]:
    """(chosen candidate, why) from the verified candidates' median times in ms; the reference among them."""
    fastest = min(medians, key=medians.get)
    reference = medians[REFERENCE]
    if fastest == REFERENCE:
        return REFERENCE, f"fastest verified, {reference:.3g} ms"
    gain = reference / medians[fastest]
    if gain < 1 + min_gain:
        return REFERENCE, (f"{fastest} only {gain:.3f}x the reference ({medians[fastest]:.3g} against "
                           f"{reference:.3g} ms), under the {1 + min_gain:.2f}x that replaces PyTorch's path")
    return fastest, f"{gain:.2f}x the reference ({medians[fastest]:.3g} against {reference:.3g} ms)"
