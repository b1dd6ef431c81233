"""Errors the CLI turns into one line and a documented exit code (see docs/reliability.md).

Exit codes: 0 success; 1 unexpected internal error (a bug: traceback shown); 2 invalid input
(recipe, flags, paths, files, checkpoints); 3 numerical failure during quantization; 130 interrupted.
"""


class LLMQuantError(Exception):
    exit_code = 1


class UserError(LLMQuantError):
    """Bad input from the user: recipe, flags, paths, corrupt files. Exit code 2."""

    exit_code = 2


class NumericalError(LLMQuantError):
    """NaN/Inf or a Hessian that cannot be factored. Exit code 3."""

    exit_code = 3
