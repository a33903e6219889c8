"""Read what TensorRT prints: sparsity lines of the builder log, engine-inspector JSON, ONNX-parser errors,
engine/version mismatches and trtexec performance summaries. Pure text processing: no TensorRT needed.

Wording per version (checked against real logs):
- 8.0–8.6 (INFO): ``(Sparsity) Layers eligible for sparse math: a, b`` and
  ``(Sparsity) TRT inference plan picked sparse implementation for layers: ...``
- 10.x (VERBOSE only): ``(Sparsity) Found N layer(s) eligible to use sparse tactics: ...`` and
  ``(Sparsity) Chose N layer(s) using sparse tactics: ...``, possibly once per Myelin ``(foreignNode)``.
An empty list ends at the colon. ``HasSparseWeights: 1`` in the inspector does not prove a sparse tactic ran:
only a tactic whose name says ``sparse`` does.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

# A log line begins with one of these; anything else after a sparsity line is a terminal-wrapped continuation.
LINE_START = re.compile(r"^(\[\d\d/\d\d/\d{4}-|\[TensorRT\]|\[TRT\]|&&&&|\[[IWEVF!]\] )")
ELIGIBLE = [
    re.compile(r"\(Sparsity\) Layers eligible for sparse math:(?P<list>.*)$"),
    re.compile(r"\(Sparsity\) Found (?P<n>\d+) layer\(s\) eligible to use sparse tactics:(?P<list>.*)$"),
]
CHOSEN = [
    re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(?P<list>.*)$"),
    re.compile(r"\(Sparsity\) Chose (?P<n>\d+) layer\(s\) using sparse tactics:(?P<list>.*)$"),
]


def strip_comments(text: str) -> str:
    """Drop '#' header/omission lines of the recorded excerpts (TensorRT never starts a line with '#')."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def _unwrap(text: str) -> list[str]:
    """Join terminal-wrapped continuation lines back onto the sparsity line they belong to."""
    out: list[str] = []
    for line in text.splitlines():
        if out and "(Sparsity)" in out[-1] and line and not LINE_START.match(line) and "(Sparsity)" not in line:
            out[-1] += line  # the wrap may split a token ("Mat" / "Mul_139"), so no separator
        else:
            out.append(line)
    return out


def _items(raw: str) -> list[str]:
    return [x.strip() for x in raw.split(",") if x.strip()]


@dataclass
class SparsityLog:
    eligible: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    wording: str | None = None  # "8.x" | "10.x" | None (no sparsity lines: flag off, or log below VERBOSE on 10.x)
    reported_counts: list[tuple[int, int]] = field(default_factory=list)  # 10.x (found, chose) per block

    @property
    def seen(self) -> bool:
        return self.wording is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eligible_count"], d["chosen_count"] = len(self.eligible), len(self.chosen)
        return d


def parse_sparsity(text: str) -> SparsityLog:
    log = SparsityLog()
    found = None
    for line in _unwrap(strip_comments(text)):
        for kind, patterns in (("eligible", ELIGIBLE), ("chosen", CHOSEN)):
            for i, pat in enumerate(patterns):
                m = pat.search(line)
                if not m:
                    continue
                log.wording = "8.x" if i == 0 else "10.x"
                target = log.eligible if kind == "eligible" else log.chosen
                target.extend(x for x in _items(m.group("list")) if x not in target)
                if i == 1:
                    if kind == "eligible":
                        found = int(m.group("n"))
                    else:
                        log.reported_counts.append((found or 0, int(m.group("n"))))
    return log


@dataclass
class LayerTactic:
    name: str
    layer_type: str | None
    tactic: str | None
    has_sparse_weights: bool
    sparse_tactic: bool


class LayerInfoError(ValueError):
    """Layer-info JSON that parses but is not an inspector document (a list, a number, layers of the wrong type)."""


def _json_kind(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def parse_inspector(text: str) -> dict:
    """Engine-inspector / ``trtexec --exportLayerInfo`` JSON (8.4, 10.x, 11.x) → per-layer tactics + summary.
    Raises ``json.JSONDecodeError`` for text that is not JSON, ``LayerInfoError`` for JSON of another shape."""
    data = json.loads(strip_comments(text))
    if not isinstance(data, dict):
        raise LayerInfoError(f'is a JSON {_json_kind(data)}, not an object with a "Layers" list')
    raw_layers = data.get("Layers", [])
    if not isinstance(raw_layers, list):
        raise LayerInfoError(f'has "Layers" as a JSON {_json_kind(raw_layers)}, not a list')
    layers = []
    for i, entry in enumerate(raw_layers):
        if isinstance(entry, str):  # profiling verbosity below DETAILED gives names only
            layers.append(LayerTactic(entry, None, None, False, False))
            continue
        if not isinstance(entry, dict):
            raise LayerInfoError(f'has "Layers"[{i}] as a JSON {_json_kind(entry)}, not a layer object or name')
        tactic = entry.get("TacticName")
        if tactic is not None and not isinstance(tactic, str):
            raise LayerInfoError(f'has "Layers"[{i}].TacticName as a JSON {_json_kind(tactic)}, not a string')
        layers.append(LayerTactic(
            str(entry.get("Name", "?")), entry.get("LayerType"), tactic, bool(entry.get("HasSparseWeights", 0)),
            bool(tactic and re.search(r"sparse", tactic, re.IGNORECASE)),
        ))
    io_key = "I/O Tensors" if "I/O Tensors" in data else "Bindings"
    io = data.get(io_key, [])
    if not isinstance(io, list):
        raise LayerInfoError(f'has "{io_key}" as a JSON {_json_kind(io)}, not a list')
    return {
        "schema": "11.x (I/O Tensors)" if "I/O Tensors" in data else ("10.x" if any(
            isinstance(e, dict) and "StreamId" in e for e in raw_layers) else "8.x"),
        "detailed": any(t.tactic for t in layers),
        "layers": [asdict(t) for t in layers],
        "with_sparse_weights": [t.name for t in layers if t.has_sparse_weights],
        "sparse_tactics": [t.name for t in layers if t.sparse_tactic],
        "io_tensors": [e.get("Name", e) if isinstance(e, dict) else e for e in io],
    }


def parse_parser_errors(text: str) -> list[str]:
    """The ONNX parser's complaints, one readable line each (unsupported ops, missing plugins, node numbers)."""
    problems = []
    for line in strip_comments(text).splitlines():
        for pat, fmt in (
            (r"No (?:checker|importer) registered for op: (\S+?)\.?(?:\s|$)", "unsupported ONNX op {0}"),
            (r"While parsing node number (\d+) \[(\S+) -> ", "failed at node {0} ({1})"),
            (r"Cannot find plugin: ([^,]+), version: ([^,]+)", "no plugin {0} (version {1})"),
            (r"Plugin not found", "plugin not found (name, version or namespace)"),
        ):
            m = re.search(pat, line)
            if m:
                msg = fmt.format(*m.groups())
                if msg not in problems:
                    problems.append(msg)
    return problems


def parse_deserialize_error(text: str) -> dict | None:
    """An engine built by another TensorRT: which versions the message names, or None."""
    text = strip_comments(text)
    m = re.search(r"expecting library version (\S+) got (\S+?),", text)
    if m:
        return {"runtime": m.group(1), "engine": m.group(2), "kind": "library version"}
    m = re.search(r"Current Version: (\d+), Serialized Engine Version: (\d+)", text)
    if m:
        return {"runtime": m.group(1), "engine": m.group(2), "kind": "serialization tag"}
    if "Magic tag does not match" in text:
        return {"runtime": None, "engine": None, "kind": "not a TensorRT plan"}
    return None


def parse_trtexec_performance(text: str) -> dict:
    out = {}
    for key, pat in (("throughput_qps", r"Throughput: ([\d.]+) qps"),
                     ("latency_mean_ms", r"\] Latency: min = [\d.]+ ms, max = [\d.]+ ms, mean = ([\d.]+) ms"),
                     ("gpu_compute_mean_ms", r"GPU Compute Time: min = [\d.]+ ms, max = [\d.]+ ms, mean = ([\d.]+) ms")):
        vals = [float(v) for v in re.findall(pat, text)]
        if vals:
            out[key] = vals[-1]
    code = banner_code(text)
    if code is not None:
        out["tensorrt_version_code"] = code
    return out


def banner_code(text: str) -> int | None:
    """The version code in trtexec's ``&&&& RUNNING TensorRT.trtexec [TensorRT v101601]`` banner."""
    m = re.search(r"\[TensorRT v(\d+)\]", text)
    return int(m.group(1)) if m else None


def version_from_code(code: int) -> str:
    """trtexec's banner code: ``v8402`` → 8.4.2 (major·1000 + minor·100 + patch, TensorRT ≤ 9),
    ``v101601`` → 10.16.1 (major·10000 + minor·100 + patch, TensorRT ≥ 10)."""
    if code >= 100000:
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def parse_trtexec_build(text: str) -> dict:
    """What a trtexec run says about the engine it built: TensorRT version (banner, or the ``TensorRT version:``
    line of newer releases), the selected GPU and its compute capability, precision, sparsity and typing mode.
    Keys are present only where the log says so."""
    text = strip_comments(text)
    out: dict = {}
    m = re.search(r"TensorRT version: (\d+\.\d+\.\d+)", text)
    if m:
        out["tensorrt_version"] = m.group(1)
    elif (code := banner_code(text)) is not None:
        out["tensorrt_version"] = version_from_code(code)
    for key, pat in (("device_name", r"\] Selected Device: (.+?)\s*$"),
                     ("compute_capability", r"\] Compute Capability: (\d+\.\d+)\s*$"),
                     ("precision_line", r"\] Precision: (.*?)\s*$"),
                     ("sparsity_option", r"\] Sparsity: (\w+)\s*$")):
        m = re.search(pat, text, re.MULTILINE)
        if m:
            out[key] = m.group(1)
    if "precision_line" in out:
        out["precision"] = "fp16" if "FP16" in out["precision_line"].upper() else "fp32"
    if "sparsity_option" in out:
        out["sparse_weights"] = out["sparsity_option"].lower() in ("enabled", "forced")
    if re.search(r"--stronglyTyped\b", text):
        out["strongly_typed"] = True
    shapes = {}
    for which in ("min", "opt", "max"):
        m = re.search(rf"--{which}Shapes=(\S+)", text)
        if m:
            try:
                shapes[which] = {name: [int(d) for d in dims.split("x")]
                                 for name, dims in (item.rsplit(":", 1) for item in m.group(1).split(","))}
            except ValueError:  # a shape written another way (quoted names...): not guessed
                shapes = {}
                break
    if len(shapes) == 3:
        out["shapes"] = shapes
    m = re.search(r"--onnx=(\S+)", text)
    if m:
        out["onnx"] = m.group(1).replace("\\", "/").rsplit("/", 1)[-1]
    return out


# Lines TensorRT prints once it has built (serialised) an engine, as seen in real logs: trtexec's "Engine built in"
# (8.x, 10.x), the builder's "Engine generation completed in" (8.4, 10.16), "Adding N engine(s) to plan file"
# (10.x VERBOSE) and, when trtexec reloads what it saved, "Loaded engine size".
ENGINE_BUILT = re.compile(r"\] Engine built in [\d.]+ sec|Engine generation completed in [\d.]+ sec"
                          r"|Adding \d+ engine\(s\) to plan file|Loaded engine size: \d+ MiB")


def log_says_engine_built(text: str) -> bool:
    """Whether a log shows TensorRT building/serialising an engine (a banner and option lines alone do not)."""
    return any(ENGINE_BUILT.search(line) for line in strip_comments(text).splitlines())


def sparsity_report(log: SparsityLog, inspector: dict | None) -> dict:
    """Eligible vs chosen layers, from the log and (when DETAILED) the inspector; says what each source proves."""
    report = {"log": log.to_dict(), "inspector": None}
    if inspector is not None:
        report["inspector"] = {k: inspector[k] for k in ("schema", "detailed", "with_sparse_weights", "sparse_tactics")}
    chosen = set(log.chosen) | set(inspector["sparse_tactics"] if inspector else [])
    report["layers_with_sparse_tactic"] = sorted(chosen)
    report["summary"] = (
        f"{len(log.eligible)} layer(s) eligible, {len(chosen)} picked a sparse tactic"
        if log.seen else "no sparsity lines in the log (SPARSE_WEIGHTS off, or TensorRT 10.x logged below VERBOSE)"
    )
    return report
