"""Compression policies: one module per method (see DESIGN.md). Build any method by name with
`jaxkv.policies.registry.make_policy`; the classes are importable from their modules, and the
three methods of the project from here."""
from jaxkv.policies.base import Policy, check_budget, last_positions


def __getattr__(name):  # lazy: importing jaxkv.policies stays light
    if name == "RLKV":
        from jaxkv.policies.rlkv import RLKV
        return RLKV
    if name == "GRKV":
        from jaxkv.policies.grkv import GRKV
        return GRKV
    if name == "RDKV":
        from jaxkv.policies.rdkv import RDKV
        return RDKV
    raise AttributeError(f"module 'jaxkv.policies' has no attribute {name!r}")


__all__ = ["Policy", "check_budget", "last_positions", "RLKV", "GRKV", "RDKV"]
