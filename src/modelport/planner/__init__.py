"""Capacity planner: sizes weights, KV cache and parallelism before a deploy (`modelport plan`).

It shares the engine's KV accounting (modelport.config) so its token counts are the ones the
engine allocates.
"""
