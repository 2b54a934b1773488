"""Method registry: build any compression method at any budget by name.

A *factory* is `factory(budget: float, model: Model, **settings) -> policy or None`, where `None`
means "keep the full dense cache". The evaluation harness (`jaxkv.eval`) only ever goes through
`make_policy`, so adding a method to every comparison is one registration:

    from jaxkv.policies.registry import register_method

    @register_method("snapkv")
    def _snapkv(budget, model, window=32, kernel=5):
        return SnapKV(budget=budget, window=window, kernel=kernel)

Policy modules that register themselves on import are listed in `_PLUGIN_MODULES`; they are
imported the first time the registry is consulted, so `available_methods()` sees them without the
caller importing each module.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Optional, Tuple

from jaxkv.policies.base import check_budget

Factory = Callable[..., Any]  # (budget: float, model, **settings) -> policy | None

_REGISTRY: Dict[str, Factory] = {}

#: Modules imported lazily before any lookup; each calls `register_method` at import time.
#: Add a method's module here when it lands (e.g. "jaxkv.policies.snapkv").
_PLUGIN_MODULES: Tuple[str, ...] = (
    "jaxkv.policies.streaming",
    "jaxkv.policies.rlkv",  # also "random_heads"
    "jaxkv.policies.duo",
    "jaxkv.policies.snapkv",  # also "pyramidkv", "chunkkv"
    "jaxkv.policies.adakv",  # also "criticalkv", "critical_adakv"
    "jaxkv.policies.merging",  # "cam", "nearest_merge", "kvmerger"
    "jaxkv.policies.grkv",
    "jaxkv.policies.rdkv", "jaxkv.policies.kivi",  # "rdkv"; "kivi2/4", "int8", "snapkv_kivi4"
    "jaxkv.policies.h2o",
    "jaxkv.policies.rkv",
)
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGIN_MODULES:
        importlib.import_module(module)


def register_method(name: str, factory: Optional[Factory] = None, *, overwrite: bool = False):
    """Register `factory` under `name`; usable directly or as a decorator.

    `register_method("x", f)` returns `f`; `@register_method("x")` registers the decorated
    function. Registering a taken name raises ValueError unless `overwrite=True`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: a method name must be a non-empty string")

    def _register(fn: Factory) -> Factory:
        if not callable(fn):
            raise ValueError(f"factory={fn!r} for method {name!r}: must be callable "
                             f"(budget, model, **settings) -> policy or None")
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
            raise ValueError(f"method {name!r} is already registered; pass overwrite=True to "
                             f"replace it")
        _REGISTRY[name] = fn
        return fn

    if factory is None:
        return _register
    return _register(factory)


def unregister_method(name: str) -> None:
    """Remove a registered method (mainly for tests); unknown names raise ValueError."""
    _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(_unknown(name))
    del _REGISTRY[name]


def available_methods() -> Tuple[str, ...]:
    """Names of all registered methods, sorted."""
    _load_plugins()
    return tuple(sorted(_REGISTRY))


def get_factory(name: str) -> Factory:
    _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(_unknown(name))
    return _REGISTRY[name]


def check_method(name: str, argname: str = "method") -> str:
    """Validate that `name` is a registered method; returns it."""
    _load_plugins()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(_unknown(name, argname))
    return name


def make_policy(name: str, budget: float, model: Any, **settings) -> Any:
    """Build method `name` at `budget` (fraction of the full cache in (0, 1]) for `model`.

    Returns a policy for `jaxkv.generate.generate`, or None for a full dense cache.
    `settings` go to the method's factory unchanged.
    """
    factory = get_factory(name)
    budget = check_budget(budget)
    if model is None or not hasattr(model, "config") or not hasattr(model, "params"):
        raise ValueError(f"model={model!r}: give the jaxkv.Model the policy is for (its config "
                         f"sizes the policy), e.g. jaxkv.load('smollm2-135m-instruct')")
    return factory(budget, model, **settings)


def _unknown(name: Any, argname: str = "method") -> str:
    known = ", ".join(sorted(_REGISTRY)) or "(none)"
    return f"{argname}={name!r}: unknown method; available are {known}"


# ---- built-in methods ---------------------------------------------------------------------------

@register_method("full")
def _full(budget: float, model: Any, **settings) -> None:
    """The uncompressed dense cache, whatever the budget (the harness records the measured one)."""
    if settings:
        raise ValueError(f"method 'full' takes no settings; got {', '.join(sorted(settings))}")
    return None


__all__ = ["register_method", "unregister_method", "make_policy", "available_methods",
           "get_factory", "check_method"]
