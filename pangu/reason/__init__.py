"""Pangu Embedded: verifiable reasoning tasks, iterative distillation with merging, the fast/slow dual system,
and RL (GRPO with MARS rewards, a sandbox for code, the latency-tolerant scheduler); spec pangu_embedded.md.

Submodules are imported by name (`pangu.reason.tasks`, `chat`, `merging`, `distill`, `dual`, `sandbox`,
`rewards`, `grpo`, `scheduler`); nothing heavy is imported here, so `import pangu.reason` stays cheap.
"""
