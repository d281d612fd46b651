"""Pangu Embedded: reasoning, distillation and RL (the spec in pangu_embedded.md)."""
