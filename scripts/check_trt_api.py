"""Check, without a GPU, that every TensorRT name our code uses exists in real TensorRT releases.

TensorRT cannot run on a CPU-only machine, but its Python bindings wheel (``tensorrt-cu12-bindings`` on PyPI,
~1.3 MB, no CUDA inside) is a pybind11 module whose class, enum-value, method and keyword names are stored as
C strings. This script

1. collects, from the modules that drive TensorRT, every ``trt.X.Y`` chain, every attribute used on a TensorRT
   object (builder, config, network, parser, engine, context, runtime, inspector, profiles, timing caches) and
   every keyword argument passed to one;
2. downloads the bindings wheel of each requested version (``pip download --no-deps``, cached);
3. reports each name missing from a version's bindings. Names the code uses only behind a version check are
   listed in ``VERSION_ONLY`` and must be *absent* from the other major (so the guard is really needed).

Limit: a string table proves a name exists in the bindings, not that it belongs to that exact class.

    python scripts/check_trt_api.py [--versions 10.16.1.11 11.4.0.106] [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["sparsekd_deploy/exporters/tensorrt.py", "sparsekd_deploy/targets/tensorrt.py", "sparsekd_deploy/speedup.py"]
# Local names that hold TensorRT objects in those modules.
TRT_OBJECTS = {"builder", "config", "cfg", "network", "net", "parser", "engine", "context", "ctx", "runtime",
               "inspector", "opt", "cache", "mm", "const", "x"}
TRT_SELF_ATTRS = {"engine", "context"}  # self.engine, self.context
# Used only behind `if major < 11` / `>= 11`: name -> the major version that must have it.
VERSION_ONLY = {"FP16": 10}
PYTHON_NAMES = {"__version__", "split", "__init__", "shape", "name"}


def used_names(paths: list[Path]) -> dict[str, set[str]]:
    """name -> the modules that use it."""
    names: dict[str, set[str]] = {}

    def add(name, where):
        if name not in PYTHON_NAMES:
            names.setdefault(name, set()).add(where)

    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain, base = [], node
                while isinstance(base, ast.Attribute):
                    chain.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "trt":
                    for part in chain:
                        add(part, path.name)
                elif isinstance(node.value, ast.Name) and node.value.id in TRT_OBJECTS:
                    add(node.attr, path.name)
                elif (isinstance(node.value, ast.Attribute) and node.value.attr in TRT_SELF_ATTRS
                      and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
                    add(node.attr, path.name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                recv = node.func.value
                if isinstance(recv, ast.Name) and recv.id in TRT_OBJECTS | {"trt"}:
                    for kw in node.keywords:
                        if kw.arg:
                            add(kw.arg, path.name)
    return names


def bindings_strings(version: str, cache: Path) -> set[str]:
    """Identifier-like C strings of that version's ``tensorrt.so``, with tail-merged suffixes expanded."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache),
                        f"tensorrt-cu12-bindings=={version}"], check=True)
        wheels = list(cache.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        so = next(n for n in zf.namelist() if n.endswith("tensorrt.so"))
        blob = zf.read(so)
        # Python-level aliases (trt.float16, ...) live in the package's __init__.py, not in the .so.
        init = next(n for n in zf.namelist() if n.endswith("tensorrt_bindings/__init__.py"))
        idents = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*=", zf.read(init).decode()))
    for raw in re.findall(rb"(?<=\x00)[A-Za-z_][A-Za-z0-9_]{1,80}(?=\x00)", blob):  # whole C strings only
        s = raw.decode()
        # The linker merges "Builder" into the tail of "IBuilder" and "mark_output" into "unmark_output":
        # every suffix of an identifier string is a name too (a doc string never qualifies).
        idents.update(s[i:] for i in range(len(s)))
    return idents


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", nargs="+", default=["10.16.1.11", "11.4.0.106"])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sparsekd-deploy" / "trt-bindings")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    names = used_names([ROOT / m for m in MODULES])
    report, ok = {"names": sorted(names), "versions": {}}, True
    for version in args.versions:
        major = int(version.split(".")[0])
        have = bindings_strings(version, args.cache)
        missing = sorted(n for n in names if n not in have and VERSION_ONLY.get(n, major) == major)
        guard_unneeded = sorted(n for n, m in VERSION_ONLY.items() if m != major and n in have)
        report["versions"][version] = {"missing": missing, "version_only_but_present": guard_unneeded}
        ok &= not missing
        status = "OK" if not missing else "MISSING " + ", ".join(missing)
        print(f"TensorRT {version}: {len(names)} names used, {status}")
        for n in guard_unneeded:
            print(f"  note: {n} is guarded as {VERSION_ONLY[n]}.x-only but exists in {version}")
        for n, m in VERSION_ONLY.items():
            if m != major and n not in have:
                print(f"  {n}: absent in {version}, used only on {m}.x (guard needed)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
