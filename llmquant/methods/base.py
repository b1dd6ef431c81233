"""The method registry: `@register` adds a method class under its name (from its config), and the
recipe, the runner and `llmquant methods` look methods up here. The contract itself (MethodConfig,
Observer, Method) is in llmquant/core/method.py."""

from __future__ import annotations

from llmquant.core.method import HessianMethodConfig, Method, MethodConfig, Observer

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Method]]:
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


__all__ = ["HessianMethodConfig", "Method", "MethodConfig", "Observer", "available_methods", "get_method_class", "register"]
