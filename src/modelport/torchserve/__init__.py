"""TorchServe compatibility: .mar archives, handlers in worker processes, a model registry.

The HTTP side (inference and management APIs) lives in modelport.entrypoints.torchserve.
"""
