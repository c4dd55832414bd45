"""Triton-compatible model repository (config.pbtxt, backends, batching, ensembles)."""
