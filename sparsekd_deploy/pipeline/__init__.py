"""The library's top: chains distill → export → bundle → validate. Commands call it; it never imports them.

``build`` and its types load on first use (PEP 562): the device-side steps in this package (``engine``,
``engine_register``) must import without torch, which ``build`` needs.
"""

__all__ = ["BuildOptions", "BuildResult", "build"]


def __getattr__(name: str):
    if name in __all__:
        from importlib import import_module

        mod = import_module(".build", __name__)
        # All three at once: importing the submodule bound `build` to the module; the public name is the function.
        globals().update({n: getattr(mod, n) for n in __all__})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
