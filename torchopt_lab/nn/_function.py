"""How the layers call their autograd Functions so that both ``torch.func`` and ``torch.compile``
take them.

Forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``hessian``) needs a Function's ``jvp``, but
Dynamo refuses to trace a Function that defines one (a graph break at every layer). So a Function
written with a ``jvp`` is decorated with :func:`forward_mode`, which moves the ``jvp`` to a twin
subclass, and the layers call :func:`apply`: the Function itself while ``torch.compile`` traces,
the twin with the ``jvp`` everywhere else. Forward-mode AD through a compiled model is therefore
unavailable; every eager path, ``torch.func`` included, has the ``jvp``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

FunctionType = TypeVar("FunctionType", bound=type[torch.autograd.Function])

_WITH_JVP: dict[type[torch.autograd.Function], type[torch.autograd.Function]] = {}


def forward_mode(function: FunctionType) -> FunctionType:
    """Class decorator: move ``function``'s ``jvp`` to a twin subclass that :func:`apply` runs
    outside ``torch.compile``."""
    jvp = function.__dict__["jvp"]
    delattr(function, "jvp")
    _WITH_JVP[function] = type(function)(
        function.__name__,
        (function,),
        {
            "jvp": jvp,
            "__module__": function.__module__,
            "__qualname__": function.__qualname__,
            "__doc__": function.__doc__,
        },
    )
    return function


def apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)``, with the ``jvp`` that :func:`forward_mode` set aside unless
    ``torch.compile`` is tracing."""
    if torch.compiler.is_compiling():
        return function.apply(*args)
    return _WITH_JVP.get(function, function).apply(*args)
