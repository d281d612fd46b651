"""Pangu Embedded: verifiable reasoning tasks, iterative distillation with merging, and the fast/slow dual system.

Submodules are imported by name (`pangu.reason.tasks`, `chat`, `merging`, `distill`, `dual`); nothing heavy is
imported here, so `import pangu.reason` stays cheap.
"""
