"""A model config's `instance_group { rate_limiter {...} }` as the rate limiter's terms.

Why apart from the limiter: serving/rate_limiter.py stays free of protobuf; this is the
only place that knows how Triton's ModelRateLimiter message maps onto it.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from modelport.serving.rate_limiter import InstanceLimits, Resource


def instance_limits(cfg: mc.ModelConfig) -> list[InstanceLimits]:
    """One entry per instance, in `backends.base.expand_instances` order."""
    out: list[InstanceLimits] = []
    for group in cfg.instance_group:
        rl = group.rate_limiter
        resources = tuple(Resource(r.name, r.count, getattr(r, "global")) for r in rl.resources)
        devices = list(group.gpus) if group.kind == mc.ModelInstanceGroup.KIND_GPU else [0]
        for dev in devices:
            for _ in range(group.count):
                out.append(InstanceLimits(dev, rl.priority, resources))
    return out or [InstanceLimits()]


__all__ = ["instance_limits"]
