"""ONNX export of decoder LMs, with KV cache (past/present key-values) or without.

optimum-onnx's exporter is the ecosystem's convention (per-architecture KV-cache handling, dynamic
batch/sequence/past axes); ``torch.onnx.export`` is the fallback for architectures it has no config for
(logits only, no KV cache). The result says which one ran.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import SparseKDError, first_line

# ONNX Runtime's contrib operators (MultiHeadAttention, RotaryEmbedding, ...): only ONNX Runtime loads them.
ORT_DOMAIN = "com.microsoft"
# Models over 2 GB must keep weights outside the protobuf (its hard limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportError(SparseKDError):
    pass


# Attention exports as scaled_dot_product_attention, which ONNX has from opset 14 on (13 fails inside the exporter).
MIN_OPSET = 14


def check_opset(opset: int | None) -> None:
    """Refuse, before any work, an opset the exporter cannot write (it fails deep in tracing otherwise)."""
    if opset is None:
        return
    from torch.onnx import _constants  # the exporter's own upper bound (private: there is no public one)

    top = getattr(_constants, "ONNX_MAX_OPSET", MIN_OPSET)
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {top}; pick one of those or "
                          "omit --opset for its default")


@dataclass
class ExportInfo:
    path: str
    exporter: str  # "optimum" | "torch.onnx"
    opset: int
    with_past: bool
    external_data: bool
    precision: str = "fp32"
    fallback: str | None = None  # why optimum's export (with KV cache) was not used, when torch.onnx's was

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' tracing chatter (pages of TracerWarnings that mean nothing to a user) for the export
    only: the warning filters and logger levels are restored afterwards, so a library caller keeps its own."""
    # optimum sets levels on its child loggers, so quieting the parent is not enough.
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith(("optimum", "transformers", "torch.onnx"))]
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Warning, module=r"(torch|transformers|optimum)\..*")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def export_onnx(model_dir: str | Path, out: str | Path, *, opset: int | None = None, with_past: bool = True,
                exporter: str = "auto") -> ExportInfo:
    """Export a HF causal-LM dir to ``out`` (a .onnx file; ``out``'s external data lands beside it)."""
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a Hugging Face model dir (no config.json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        used = fallback = None
        if exporter in ("auto", "optimum"):
            try:
                used = _optimum(model_dir, tmp, opset, with_past)
            except Exception as e:  # an architecture it has no config for, or its own failure on this one
                if exporter == "optimum":
                    raise ExportError(f"optimum could not export {model_dir}: {first_line(e)}") from None
                fallback = f"optimum could not export it ({type(e).__name__}: {first_line(e)})"
        if used is None:
            try:
                used = _torch_onnx(model_dir, tmp / "model.onnx", opset or 18)
            except Exception as e:
                before = f"{fallback}; " if fallback else ""
                raise ExportError(f"cannot export {model_dir} to ONNX: {before}torch.onnx failed too "
                                  f"({type(e).__name__}: {first_line(e)})") from None
            with_past = False
        info = _finalize(tmp / "model.onnx", out, used, with_past)
        info.fallback = fallback
        return info


def _optimum(model_dir: Path, tmp: Path, opset, with_past) -> str:
    from optimum.exporters.onnx import main_export

    task = "text-generation-with-past" if with_past else "text-generation"
    with _quiet():  # entered after the import: optimum's loggers exist only now
        main_export(str(model_dir), tmp, task=task, opset=opset, local_files_only=True, do_validation=False,
                    library_name="transformers")
    return "optimum"


def _torch_onnx(model_dir: Path, path: Path, opset: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    # eager attention: the SDPA/mask fast paths do not trace with the TorchScript exporter.
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                 attn_implementation="eager").eval()
    model.config.use_cache = False

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.ones(1, 8, dtype=torch.long)
    with warnings.catch_warnings():
        # attributed to this call, so _quiet's per-module filter misses them (training mode, dynamic_axes advice)
        warnings.simplefilter("ignore")
        _torch_onnx_export(torch, LogitsOnly(model).eval(), ids, path, opset)
    return "torch.onnx"


def _torch_onnx_export(torch, module, ids, path: Path, opset: int) -> None:
    torch.onnx.export(
        module, (ids, torch.ones_like(ids)), str(path), opset_version=opset, dynamo=True, verbose=False,
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                      "attention_mask": {0: "batch_size", 1: "sequence_length"},
                      "logits": {0: "batch_size", 1: "sequence_length"}},
    )


def _finalize(src: Path, out: Path, exporter: str, with_past: bool) -> ExportInfo:
    import onnx

    model = onnx.load(str(src))  # loads external data too
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    size = sum(init.ByteSize() for init in model.graph.initializer)
    external = size > EXTERNAL_DATA_BYTES
    save_onnx(model, out, external)
    return ExportInfo(str(out), exporter, opset, with_past, external)


def save_onnx(model, out: Path, external: bool) -> None:
    """Write into a fresh temp folder beside ``out``, then rename into place: a crash never leaves a half-written
    model. The external-data file too: onnx appends to a data file already at its location (a save over an earlier
    one doubled it), so it is written whole in the temp folder and renamed over the old one just before the graph
    (those two renames are the only window where graph and data do not match). A graph saved in one file removes a
    data file an earlier external save left beside it (``onnx_files`` would count it as the graph's)."""
    import onnx

    data = out.with_name(out.name + ".data")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        if external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            os.replace(staged.with_name(data.name), data)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, out)
    if not external:
        data.unlink(missing_ok=True)


def onnx_files(path: Path) -> list[Path]:
    """The model file and its external-data file, if any."""
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])


def all_nodes(graph):
    """Every node of ``graph`` and of the subgraphs its If / Loop / Scan nodes hold (depth first)."""
    from onnx import AttributeProto

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_nodes(g)
