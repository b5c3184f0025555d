"""spendgate.operator: the Kubernetes operator (kopf handlers, reconciliation, admission).

This folder is mapped to ``spendgate.operator`` by pyproject. When Python runs with a checkout's
root on ``sys.path`` (``python -m ...`` or ``python -c`` started there), the folder would also
be found as the top-level module ``operator`` and shadow the standard library. In that case this
file loads the standard library's ``operator`` in its own place, so the checkout never shadows it.
"""

if __name__ == "operator":
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder

    _spec = _PathFinder.find_spec("operator", [_os.path.dirname(_os.__file__)])
    if _spec is None or _spec.loader is None:
        raise ImportError("the standard library's operator module was not found")
    _stdlib = type(_sys)("operator")
    _stdlib.__spec__ = _spec
    _stdlib.__file__ = _spec.origin
    _spec.loader.exec_module(_stdlib)
    _sys.modules["operator"] = _stdlib
