"""Candidates that tests plant for backend="auto" (backend.add_extra), each a backend module with the contract of
resaspp_ops/backend/__init__.py built on the reference backend: a wrong one, a slow one, a raising one and a fast
one (which returns a stored copy of the reference's results for inputs it has seen). Never a real backend edited.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from resaspp_ops import backend as backend_registry
from resaspp_ops import autotune


def _reference(family):
    return backend_registry.get("reference", family)


def _available(device, dtype):
    return True, "planted by a test"


def _off_by_one_row(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t with its last spatial row scaled: the structured error of a wrong tap on a border row."""
    t = t.clone()
    t[:, :, -1, :] *= factor
    return t


def wrong_forward(family=backend_registry.MULTI_RATE, factor=1.01):
    """Its forward's last row is `factor` off; its backward is right."""
    ref = _reference(family)
    return SimpleNamespace(availability=_available, calls=[],
                           forward=lambda *a: _off_by_one_row(ref.forward(*a), factor), backward=ref.backward)


def wrong_input_grad(family=backend_registry.MULTI_RATE, factor=1.01):
    """Its forward and weight grads are right; its input grad's last row is `factor` off."""
    ref = _reference(family)

    def backward(*args):
        grads = list(ref.backward(*args))
        if grads[0] is not None:
            grads[0] = _off_by_one_row(grads[0], factor)
        return tuple(grads)

    return SimpleNamespace(availability=_available, forward=ref.forward, backward=backward)


def raising(family=backend_registry.MULTI_RATE):
    def fail(*args):
        raise RuntimeError("planted failure")

    return SimpleNamespace(availability=_available, forward=fail, backward=fail)


def slow(family=backend_registry.MULTI_RATE, delay_s=0.05):
    """The reference's results, delay_s late."""
    ref = _reference(family)

    def later(fn):
        def run(*args):
            time.sleep(delay_s)
            return fn(*args)
        return run

    return SimpleNamespace(availability=_available, forward=later(ref.forward), backward=later(ref.backward))


def _identity(args) -> tuple:
    return tuple((id(a), a._version) if isinstance(a, torch.Tensor) else a for a in args)


def fast(family=backend_registry.MULTI_RATE, forward=True, backward=True):
    """Computes the reference's results once per inputs and returns copies of them after: faster than any
    convolution, and right. forward / backward False: that direction is the reference's, plus a delay."""
    ref = _reference(family)
    stored: dict = {}
    calls = {"forward": 0, "backward": 0}

    def memo(name, fn):
        def run(*args):
            calls[name] += 1
            key = (name, _identity(args))
            if key not in stored:
                stored[key] = fn(*args)
            results = stored[key]
            return results.clone() if isinstance(results, torch.Tensor) else tuple(
                None if r is None else r.clone() for r in results)
        return run

    def counted(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)
        return run

    slowed = slow(family, 0.05)
    return SimpleNamespace(availability=_available, calls=calls,
                           forward=memo("forward", ref.forward) if forward else counted("forward", slowed.forward),
                           backward=memo("backward", ref.backward) if backward else counted("backward",
                                                                                             slowed.backward))


def plant(name: str, module, family=backend_registry.MULTI_RATE) -> None:
    backend_registry.add_extra(name, module, family)


def clear(family=backend_registry.MULTI_RATE) -> None:
    for name in backend_registry.extras(family):
        backend_registry.remove_extra(name, family)


def trial(decision, candidate):
    return next(t for t in decision.trials if t.candidate == candidate)


def decision_for(direction: str, family=backend_registry.MULTI_RATE):
    found = [d for d in autotune.auto_choices() if d.key.direction == direction and d.key.family == family]
    assert len(found) == 1, [d.summary() for d in autotune.auto_choices()]
    return found[0]
