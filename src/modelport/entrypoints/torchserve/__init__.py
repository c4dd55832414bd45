"""TorchServe's HTTP APIs: inference (predictions, ping, KServe v1) and management."""
