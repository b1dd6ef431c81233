"""Method backends. Importing this package registers every built-in method."""

from llmquant.methods.base import Method, MethodConfig, available_methods, get_method_class, register

# Registration happens on import; one line per built-in method.
from llmquant.methods import billm, gptq, pbllm, rtn, sign, slim  # noqa: E402,F401

__all__ = ["Method", "MethodConfig", "available_methods", "get_method_class", "register"]
