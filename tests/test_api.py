"""The public surface: every name a package exports resolves after `import jaxkv`, and every
registered method's policy class and every cache layout is reachable from `jaxkv.policies` /
`jaxkv.cache`."""
import dataclasses

import jaxkv
from jaxkv.policies.base import Policy


def test_every_exported_name_resolves():
    for package in (jaxkv, jaxkv.policies, jaxkv.cache):
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)


def test_policy_classes_and_cache_layouts_are_exported():
    exported = {getattr(jaxkv.policies, n) for n in jaxkv.policies.__all__}
    model = jaxkv.load("tiny")
    for method in jaxkv.available_methods():
        if method == "full":  # no policy (rlkv / duo use the gates shipped for tiny)
            continue
        policy = jaxkv.make_policy(method, 0.5, model)
        assert type(policy) in exported, method
        assert isinstance(policy, Policy) and dataclasses.is_dataclass(policy)
    layouts = {c.__name__ for c in (getattr(jaxkv.cache, n) for n in jaxkv.cache.__all__)
               if isinstance(c, type)}
    assert {"DenseCache", "SparseCache", "HeadSplitCache", "SinkWindowCache", "BudgetCache",
            "QuantizedCache", "MixedCache", "GatedDenseCache"} <= layouts
