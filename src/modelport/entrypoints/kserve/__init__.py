"""KServe v2 / Triton protocol frontend: REST routes, gRPC service, metrics."""
