"""The library's top: chains distill → export → bundle → validate. Commands call it; it never imports them."""

from .build import BuildOptions, BuildResult, build

__all__ = ["BuildOptions", "BuildResult", "build"]
