"""Triton's rate limiter (`--rate-limit execution_count`): model instances share resources.

Why a server-wide object: resources (`instance_group { rate_limiter { resources [...] } }`)
are counted across every loaded model, so that e.g. two memory-hungry models never run at
once. An instance runs a batch only after it holds all of its resources; it gives them back
when the batch ends (also when it fails).

Rules, as Triton's core (rate_limiter.cc):
- A resource is per device (keyed by the instance's device id) unless `global: true`; one
  name cannot be both.
- The server's count of a resource is the largest count any loaded instance asks for, unless
  `--rate-limit-resource NAME:COUNT[:DEVICE]` gives it (no DEVICE: every device). Once any is
  given, a resource not given counts 0, and a count below what an instance needs fails that
  model's load.
- Waiting instances are ordered by `exec_count * max(priority, 1)`, lowest first (priority 1
  is the highest; an instance of priority 2 gets half the chances of one of priority 1).
  Only the first in that order is tried: if its resources are busy, the others wait behind
  it (Triton's staging queue); ties go first come, first served.

Plain asyncio and no torch or protobuf: `InstanceLimits` is built from the config elsewhere.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "GLOBAL",
    "PER_DEVICE",
    "Gate",
    "InstanceLimits",
    "RateLimitError",
    "RateLimiter",
    "Resource",
    "parse_resource_option",
]

GLOBAL = "GLOBAL"  # the device key of global resources
PER_DEVICE = -1  # an explicit resource given without a device: every device has it

Key = tuple[int | str, str]  # (device id or GLOBAL, resource name)


class RateLimitError(ValueError):
    """The resources of an instance can never be satisfied (Triton's words)."""


@dataclass(frozen=True)
class Resource:
    name: str
    count: int
    is_global: bool = False


@dataclass(frozen=True)
class InstanceLimits:
    """What one model instance needs before it may run (its group's rate_limiter)."""

    device_id: int = 0
    priority: int = 0
    resources: tuple[Resource, ...] = ()

    def needs(self) -> dict[Key, int]:
        out: dict[Key, int] = {}
        for r in self.resources:  # a name listed twice: the last wins, as Triton's map
            out[(GLOBAL if r.is_global else self.device_id, r.name)] = r.count
        return out


def parse_resource_option(arg: str) -> tuple[str, int, int]:
    """`--rate-limit-resource NAME:COUNT[:DEVICE]` -> (name, count, device or PER_DEVICE)."""
    error = (
        "--rate-limit-resource option format is '<resource_name>:<count>:<device>' or "
        f"'<resource_name>:<count>'. Got {arg}"
    )
    parts = arg.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError(error)
    try:
        count = int(parts[1])
        device = int(parts[2]) if len(parts) == 3 else PER_DEVICE
    except ValueError:
        raise ValueError(error) from None
    if count < 0 or (len(parts) == 3 and device < 0):
        raise ValueError(error)
    return parts[0], count, device


class Gate:
    """One registered instance: `await acquire()` before its batch, `release()` after."""

    def __init__(self, limiter: RateLimiter, limits: InstanceLimits) -> None:
        self.limiter = limiter
        self.limits = limits
        self.needs = limits.needs()
        self.exec_count = 0
        self.held = False

    def scaled_priority(self) -> int:
        return self.exec_count * max(self.limits.priority, 1)

    async def acquire(self) -> None:
        await self.limiter._acquire(self)

    def release(self) -> None:
        self.limiter._release(self)


class RateLimiter:
    def __init__(self, explicit: Sequence[tuple[str, int, int]] = ()) -> None:
        """explicit: the --rate-limit-resource values as (name, count, device/PER_DEVICE)."""
        self._explicit: dict[int, dict[str, int]] = {}
        for name, count, device in explicit:
            per = self._explicit.setdefault(device, {})
            per[name] = max(per.get(name, 0), count)
        self._owners: dict[str, list[Gate]] = {}
        self.limits: dict[Key, int] = {}
        self._allocated: Counter[Key] = Counter()
        self._waiting: list[tuple[int, int, Gate, asyncio.Future]] = []
        self._seq = itertools.count()

    # -- registration (model load / unload) --

    def register(self, owner: str, instances: Sequence[InstanceLimits]) -> list[Gate]:
        """Add the instances of `owner` (a model version); raise RateLimitError if the
        resource counts can never satisfy them (the model must then fail to load)."""
        if owner in self._owners:
            raise RateLimitError(f"'{owner}' is already registered with the rate limiter")
        gates = [Gate(self, limits) for limits in instances]
        self._owners[owner] = gates
        try:
            self.limits = self._compute_limits()
        except RateLimitError:
            del self._owners[owner]
            raise
        return gates

    def unregister(self, owner: str) -> None:
        gates = self._owners.pop(owner, None)
        if gates is None:
            return
        for g in gates:
            if g.held:
                g.release()
        self.limits = self._compute_limits()
        self._dispatch()

    def _compute_limits(self) -> dict[Key, int]:
        wanted: dict[Key, int] = {}
        for gates in self._owners.values():
            for g in gates:
                for key, count in g.needs.items():
                    wanted[key] = max(wanted.get(key, 0), count)
        global_names = {name for dev, name in wanted if dev == GLOBAL}
        for dev, name in wanted:
            if dev != GLOBAL and name in global_names:
                raise RateLimitError(
                    f'Resource "{name}" is present as both global and device-specific '
                    "resource in the model configuration."
                )
        if not self._explicit:
            return wanted
        out: dict[Key, int] = {}
        for (dev, name), need in wanted.items():
            if dev == GLOBAL:  # any device's explicit count of the name
                given = max((per.get(name, 0) for per in self._explicit.values()), default=0)
            else:
                given = max(
                    self._explicit.get(dev, {}).get(name, 0),  # type: ignore[arg-type]
                    self._explicit.get(PER_DEVICE, {}).get(name, 0),
                )
            if given < need:
                raise RateLimitError(
                    f'Resource count for "{name}" is limited to {given} which will prevent '
                    "scheduling of one or more model instances, the minimum required count "
                    f"is {need}"
                )
            out[(dev, name)] = given
        return out

    # -- execution --

    def _fits(self, gate: Gate) -> bool:
        return all(
            self._allocated[key] + count <= self.limits.get(key, 0)
            for key, count in gate.needs.items()
        )

    async def _acquire(self, gate: Gate) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (gate.scaled_priority(), next(self._seq), gate, fut))
        self._dispatch()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled: give back
                gate.release()
            else:
                fut.cancel()
                self._dispatch()  # it may have blocked the head of the queue
            raise

    def _dispatch(self) -> None:
        """Grant resources in priority order while the first waiting instance fits."""
        while self._waiting:
            _, _, gate, fut = self._waiting[0]
            if fut.done():
                heapq.heappop(self._waiting)
                continue
            if not self._fits(gate):
                return
            heapq.heappop(self._waiting)
            self._allocated.update(gate.needs)
            gate.held = True
            fut.set_result(None)

    def _release(self, gate: Gate) -> None:
        if not gate.held:
            return
        gate.held = False
        gate.exec_count += 1
        self._allocated.subtract(gate.needs)
        self._dispatch()

    # -- introspection (tests, logs) --

    @property
    def waiting(self) -> int:
        return sum(1 for *_, fut in self._waiting if not fut.done())

    def allocated(self) -> Mapping[Key, int]:
        return {k: v for k, v in self._allocated.items() if v}
