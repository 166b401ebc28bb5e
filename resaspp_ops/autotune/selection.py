"""backend="auto"'s measured choice: per problem key, the fastest verified candidate, decided once and kept.

decide(problem, direction): this process's decision, else the cache file's, else (in plain eager mode, where
policy allows) a measurement:

    1. candidates.candidates: the reference, each available kernel backend and variant, the planted extras;
    2. each runs once on the call's own inputs (a candidate that raises is excluded) and is verified against the
       reference backend's float64 results (verify.py: the benchmark gate's rule); a wrong one is excluded,
       with one warning naming it, the key and its error against the bound;
    3. the survivors are timed (timing.py), and decision.pick chooses (the reference stays unless a kernel is
       MIN_GAIN faster);
    4. the decision is kept in memory and merged into the cache file (cache.py), and its summary logged on the
       "resaspp_ops.autotune" logger.

Where nothing may be measured (compiled graphs, exports, modes, CUDA graph capture, deterministic algorithms),
a key without a decision runs the static order (backend.auto_order), noted so that auto_choices() shows it.
Under torch.distributed, rank 0 decides for every rank (distributed.py). COUNTS counts the work (tests: a
second process with the cache file must do none).

plan(problem, need_x, need_w) is the plain eager call's plan (backend's grammar): the forward decided now, each
backward direction that is needed decided already or left "measure" for when it runs.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import Optional

import torch

from resaspp_ops import backend as _backend
from resaspp_ops.autotune import distributed, policy
from resaspp_ops.autotune.cache import DecisionStore
from resaspp_ops.autotune.candidates import REFERENCE, candidates
from resaspp_ops.autotune.decision import (CHOSEN, MEASURED, RAISED, SLOWER, STATIC, WRONG, Decision, Trial, now,
                                           pick)
from resaspp_ops.autotune.timing import median_ms, time_candidates
from resaspp_ops.autotune.verify import verify

log = logging.getLogger("resaspp_ops.autotune")

COUNTS = {"measurements": 0, "candidate_runs": 0, "timed_runs": 0}
STORE = DecisionStore()
_STATIC: dict[str, Decision] = {}  # the static-order choices of keys without a decision (for auto_choices)
_PLANS: dict = {}  # plain eager calls' signatures -> their plan, while no decision changes
_LOOKUPS: dict = {}  # (signature, direction) -> the decision other calls run, while no decision changes
_RECORDERS: list[list] = []  # recording()'s lists


def reset() -> None:
    """Forgets every decision, plan and count of this process (the file stays); reads RESASPP_CACHE_DIR again."""
    with STORE.lock:
        STORE.reset()
        _STATIC.clear()
        _PLANS.clear()
        _LOOKUPS.clear()
        for name in COUNTS:
            COUNTS[name] = 0


@contextlib.contextmanager
def recording():
    """Collects every decision that calls inside the block use (the benchmark's record of what auto ran)."""
    used: list = []
    _RECORDERS.append(used)
    try:
        yield used
    finally:
        del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is used)]  # by identity: lists compare equal


def _used(decision: Decision) -> None:
    for used in _RECORDERS:
        if not any(d.key == decision.key for d in used):
            used.append(decision)


def static_spec(problem) -> str:
    return _backend.resolve("auto", problem.device, problem.dtype, problem.family)


def _static(problem, key, why: str) -> Decision:
    order = _backend.auto_choice(problem.device, problem.dtype, problem.family)[1]
    reason = f"not measured: {why}; the static order ({order})"
    return Decision(key, static_spec(problem), reason, STATIC)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def measure(problem, direction: str, grad: Optional[torch.Tensor], key) -> Decision:
    """Steps 1-3 of the module's docstring for one key; the reference's own failure is raised (nothing could be
    verified without it)."""
    COUNTS["measurements"] += 1
    specs = candidates(problem)
    images = problem.verified_images(direction)
    runs = {REFERENCE: functools.partial(problem.run, REFERENCE, direction, grad)}
    excluded, verified = [], {REFERENCE: "the yardstick (PyTorch's own convolutions)"}
    with torch.no_grad():
        references64 = problem.reference64(direction, grad)
        yardstick = runs[REFERENCE]()
        for spec in specs[1:]:
            COUNTS["candidate_runs"] += 1
            try:
                verdict = verify(problem.run(spec, direction, grad), references64, yardstick, problem.dtype, images)
            except Exception as exc:  # noqa: BLE001 - a candidate that raises is excluded, never fatal
                excluded.append(Trial(spec, RAISED, None, _first_line(exc)))
                warnings.warn(f"resaspp_ops backend='auto': excluded {spec} for {key.text()}: it raised "
                              f"{_first_line(exc)}", stacklevel=4)
                continue
            if not verdict.ok:
                excluded.append(Trial(spec, WRONG, None, verdict.detail))
                warnings.warn(f"resaspp_ops backend='auto': excluded {spec} for {key.text()}: wrong result, "
                              f"{verdict.detail}", stacklevel=4)
                continue
            verified[spec] = verdict.detail
            runs[spec] = functools.partial(problem.run, spec, direction, grad)
        del references64, yardstick
        times = time_candidates(runs, problem.device)
    COUNTS["timed_runs"] += sum(len(t) for t in times.values())
    medians = {spec: median_ms(t) for spec, t in times.items()}
    chosen, reason = pick(medians)
    trials = [Trial(spec, CHOSEN if spec == chosen else SLOWER, medians[spec], verified[spec]) for spec in runs]
    decision = Decision(key, chosen, reason, MEASURED, tuple(trials + excluded), now())
    log.info("resaspp_ops backend='auto': %s", decision.summary())
    return decision


def _decide_here(problem, direction: str, grad, key, eager: bool) -> Decision:
    """This process's answer for a key it has not decided: the file's, else a measurement, else static."""
    decision = STORE.lookup(key.text())
    if decision is not None:
        return decision
    why = policy.why_not_measure(problem.device) if eager else (
        "decided where the op runs inside a compiled, exported or traced graph (or under a mode)")
    if why is None and grad is None and direction != "forward":
        why = "no grad to measure the backward with"
    if why is not None:
        return _static(problem, key, why)
    return measure(problem, direction, grad, key)


def decide(problem, direction: str, grad: Optional[torch.Tensor] = None, *, eager: bool = False) -> str:
    """The spec that runs `direction` of `problem` (see the module's docstring). eager: a plain eager call,
    which may measure (policy permitting) and, under torch.distributed, decides with the other ranks; else
    this process's decision or the file's, else the static order."""
    if problem.empty():
        return static_spec(problem)  # nothing to measure or to run
    if not eager:  # a compiled graph's call, every step: the answer is memoised until a decision changes
        signature = (problem.signature(), direction)
        known = _LOOKUPS.get(signature)
        if known is None:
            known = _LOOKUPS[signature] = _lookup_or_static(problem, direction)
        _used(known)
        return known.chosen
    key = problem.key(direction)
    text = key.text()
    with STORE.lock:
        if distributed.collective():
            decision = STORE.lookup(text, disk=False)
            if decision is None:
                decision = distributed.rank0_decides(lambda: _decide_here(problem, direction, grad, key, True))
                _record(decision, persist=decision.source == MEASURED)
        else:
            decision = STORE.lookup(text)
            if decision is None:
                decision = _decide_here(problem, direction, grad, key, True)
                if decision.source == STATIC:
                    _STATIC[text] = decision
                else:
                    _record(decision, persist=True)
        _used(decision)
    return decision.chosen


def _lookup_or_static(problem, direction: str) -> Decision:
    """This process's decision or the file's for a key, else the static order (noted for auto_choices)."""
    key = problem.key(direction)
    with STORE.lock:
        decision = _decide_here(problem, direction, None, key, False)
        if decision.source == STATIC:
            _STATIC[key.text()] = decision
        return decision


def _record(decision: Decision, persist: bool) -> None:
    STORE.record(decision, persist)
    _STATIC.pop(decision.key.text(), None)
    _PLANS.clear()
    _LOOKUPS.clear()


def _known(problem, direction: str) -> Optional[str]:
    """The spec already decided for a direction (under torch.distributed: decided with the other ranks)."""
    decision = STORE.lookup(problem.key(direction).text(), disk=not distributed.collective())
    if decision is None:
        return None
    _used(decision)
    return decision.chosen


def plan(problem, need_x: bool, need_w: bool) -> str:
    """The plan of a plain eager call (see the module's docstring); need_x, need_w: whether autograd will ask
    for the input grad, the weight grads."""
    signature = (problem.signature(), need_x, need_w, torch.are_deterministic_algorithms_enabled(),
                 problem.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    known = _PLANS.get(signature)
    if known is not None:
        result, decisions = known
        for decision in decisions if _RECORDERS else ():
            _used(decision)
        return result
    with recording() as decisions:
        forward = decide(problem, "forward", eager=True)
        parts = [forward]
        for direction, needed in (("input_grad", need_x), ("weight_grad", need_w)):
            parts.append((_known(problem, direction) or _backend.MEASURE) if needed and not problem.empty()
                         else forward)
    result = _backend.join_plan(*parts)
    if _backend.MEASURE not in parts:
        _PLANS[signature] = (result, tuple(decisions))
    return result


def auto_choices() -> list[Decision]:
    """Every decision this process knows (the cache file's for this environment, those made or received here)
    and the static-order choices of keys run without one, each with its reason and candidates' trials."""
    with STORE.lock:
        decisions = STORE.all()
        known = {d.key for d in decisions}
        return decisions + [d for d in _STATIC.values() if d.key not in known]
