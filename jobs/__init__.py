"""Thin entry points, one per job: parse a config, start Ray where needed, call pipelines/."""
