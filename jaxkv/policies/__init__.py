"""Compression policies: one module per method (see DESIGN.md)."""
from jaxkv.policies.base import Policy, check_budget, last_positions

__all__ = ["Policy", "check_budget", "last_positions"]
