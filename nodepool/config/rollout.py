"""The ``rollout`` key of a diskimage (top level, or per provider in its ``diskimages``).

Our own key (Nodepool 11 has none): how a new upload is validated, rolled out and withdrawn
automatically when it does worse than the previous one.  docs/rollout.md describes each key.
"""
import os
from dataclasses import dataclass
from typing import Optional

import voluptuous as v

from .schema import Int, Mapping, Name, Number, Seq, Str


def Share(value):
    """A percentage of launches: 1 to 100."""
    return Int(1, 100)(value)


def Fraction(value):
    value = Number(0)(value)
    if value > 1:
        raise v.Invalid(f"must be between 0 and 1, got {value}")
    return value


VALIDATION = Mapping({
    v.Optional("command"): Str,
    v.Optional("label"): Name,
    v.Optional("username"): Str,
    v.Optional("key-file"): Str,
    v.Optional("timeout", default=600): Number(1),
    v.Optional("attempts", default=2): Int(1),
    v.Optional("retry-delay", default=30): Number(0),
})

ROLLOUT = Mapping({
    v.Optional("validation"): VALIDATION,
    v.Optional("steps", default=[100]): Seq(Share),
    v.Optional("step-min-launches", default=0): Int(0),
    v.Optional("step-min-time", default=0): Number(0),
    v.Optional("recheck", default=False): bool,
    v.Optional("recheck-timeout", default=60): Number(1),
    v.Optional("fallback", default={}): Mapping({
        v.Optional("enabled", default=True): bool,
        v.Optional("margin", default=0.2): Fraction,
        v.Optional("min-launches", default=10): Int(1),
    }),
})


@dataclass(frozen=True)
class Validation:
    """How a candidate upload is checked on a node booted from it."""
    command: Optional[str] = None      # None: the node must boot and answer SSH (host keys)
    label: Optional[str] = None        # None: a label of the provider that uses the image
    username: Optional[str] = None     # None: the diskimage's username
    key_file: Optional[str] = None
    timeout: float = 600
    attempts: int = 2
    retry_delay: float = 30


@dataclass(frozen=True)
class RolloutPolicy:
    validation: Optional[Validation] = None
    steps: tuple = (100,)
    step_min_launches: int = 0
    step_min_time: float = 0
    recheck: bool = False             # re-scan SSH of the candidate's ready stock nodes
    recheck_timeout: float = 60
    fallback: bool = True
    fallback_margin: float = 0.2
    fallback_min_launches: int = 10


def build_policy(data, base_dir="."):
    """A ``RolloutPolicy`` from a validated ``rollout`` mapping, and problems ``(key, message)``
    (keys relative to the ``rollout`` key).  A relative ``key-file`` is taken relative to
    ``base_dir`` (the directory of the file naming it)."""
    problems = []
    steps = list(data["steps"])
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        problems.append(("steps", f"must be increasing, got {steps}"))
    if steps and steps[-1] != 100:
        problems.append(("steps", f"the last step must be 100 (every launch), got {steps[-1]}"))
    validation = None
    if data.get("validation") is not None:
        val = data["validation"]
        if val.get("command") and not val.get("key-file"):
            problems.append(("validation.key-file", "required with validation.command (the "
                                                    "private key that logs in to the node)"))
        key_file = val.get("key-file")
        if key_file:
            key_file = os.path.normpath(os.path.join(base_dir, os.path.expanduser(key_file)))
        validation = Validation(command=val.get("command"), label=val.get("label"),
                                username=val.get("username"), key_file=key_file,
                                timeout=val["timeout"], attempts=val["attempts"],
                                retry_delay=val["retry-delay"])
    fallback = data["fallback"]
    return RolloutPolicy(validation=validation, steps=tuple(steps or [100]),
                         step_min_launches=data["step-min-launches"],
                         step_min_time=data["step-min-time"], recheck=data["recheck"],
                         recheck_timeout=data["recheck-timeout"], fallback=fallback["enabled"],
                         fallback_margin=fallback["margin"],
                         fallback_min_launches=fallback["min-launches"]), problems


def policy_for(config, image, provider):
    """The rollout policy of ``image`` on ``provider`` (the provider's own ``rollout`` wins),
    or None: no rollout, the newest ready upload serves as in Nodepool."""
    prov = config.providers.get(provider)
    pdimg = prov.diskimages.get(image) if prov else None
    if pdimg is not None and getattr(pdimg, "rollout", None) is not None:
        return pdimg.rollout
    dimg = config.diskimages.get(image)
    return getattr(dimg, "rollout", None) if dimg else None
