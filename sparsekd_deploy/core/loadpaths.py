"""Load-path analysis: which layers of a teacher carry the load, measured before anything is removed.

For every prunable unit (a layer; for ``channels:S`` an MLP block, whose projections lose the same channels) the
held-out KL(teacher‖teacher with ONLY that unit pruned to the pattern) by the default importance (wanda, scored
once on the dense teacher: with a single unit pruned, every unit's scores are the dense teacher's), plus importance
statistics: the mean score and OWL's outlier ratio (Yin et al. 2024: share of |W|·‖x‖ above ``outlier_m`` × the
layer's mean). Each unit is restored bit for bit after it is measured, so the teacher leaves the analysis unchanged.

The report (``loadpaths.json``) is stamped with the teacher's weights digest and the pattern; ``load_report``
refuses one made from another teacher or another pattern. ``allocation.py`` turns a report into per-layer
sparsities (unstructured / channels) or a set of layers kept dense (n:m).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..digests import weights_digest
from ..errors import DataError, SparseKDError
from ..fsutil import write_json_atomic
from ..models.adapters import DEFAULT_EXCLUDE, prunable_layers
from ..numerics import kl_torch, log_softmax_torch
from .importance import ScoringContext, score
from .patterns import Channels, Pattern, make_pattern
from .pruner import Pruner

FORMAT = "sparsekd-loadpaths/1"
JSON_NAME = "loadpaths.json"
PNG_NAME = "loadpaths.png"
# Teacher log-probs of the held-out set are cached (one teacher pass instead of one per layer) up to this many floats.
_CACHE_FLOATS = 1 << 28

Progress = Callable[[int, int, str], None]  # (done, total, unit name)


class LoadPathError(SparseKDError):
    """A load-path analysis that cannot run, or a loadpaths.json that does not fit the run."""


@dataclass
class LayerLoad:
    name: str  # module name (an MLP block's name for channels:S)
    kind: str  # module kind within its block, e.g. q_proj, down_proj, attn.c_proj
    block: int | None  # transformer block index (None when the name has none)
    params: int  # weights the pattern acts on
    kl: float  # held-out KL(teacher ‖ teacher with only this unit pruned)
    top1: float  # held-out top-1 agreement of that model with the teacher
    sparsity: float  # share of this unit's weights the pattern zeroed
    outlier_ratio: float  # share of scores above outlier_m × the unit's mean score (OWL)
    mean_score: float  # mean importance score (|W|·‖x‖ for wanda)


@dataclass
class LoadPathReport:
    teacher: str
    weights_digest: str | None  # None for an in-memory model (``analyze_model``); set by ``analyze``
    pattern: str
    importance: str
    outlier_m: float
    data: dict  # how the held-out and calibration sets were made (source, sizes, seq_len, seed)
    layers: list[LayerLoad]
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # layers the pattern does not fit, and why
    format: str = FORMAT

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranking"] = [ly.name for ly in self.ranked()]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoadPathReport:
        d = {k: v for k, v in d.items() if k != "ranking"}
        d["layers"] = [LayerLoad(**ly) for ly in d["layers"]]
        return cls(**d)

    def ranked(self) -> list[LayerLoad]:
        """Units by load, heaviest first (ties by name, so the order is stable)."""
        return sorted(self.layers, key=lambda ly: (-ly.kl, ly.name))

    def by_name(self) -> dict[str, LayerLoad]:
        return {ly.name: ly for ly in self.layers}

    def median_kl(self) -> float:
        kls = sorted(ly.kl for ly in self.layers)
        n = len(kls)
        return 0.0 if not n else (kls[n // 2] if n % 2 else 0.5 * (kls[n // 2 - 1] + kls[n // 2]))


# -- names -> (block index, kind) ---------------------------------------------------------------------------
def _split(name: str) -> tuple[int | None, str]:
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return int(p), ".".join(parts[i + 1:])
    return None, name


def layer_kinds(names: list[str]) -> dict[str, tuple[int | None, str]]:
    """Per name: (block index, kind). The kind is the last name component (q_proj), or the path after the block
    index where that is ambiguous (GPT-2: attn.c_proj vs mlp.c_proj)."""
    split = {n: _split(n) for n in names}
    last: dict[str, set[str]] = {}
    for _, suffix in split.values():
        last.setdefault(suffix.rsplit(".", 1)[-1], set()).add(suffix)
    out = {}
    for n, (idx, suffix) in split.items():
        if not suffix:  # the unit is a whole block (an OPT decoder layer holding its MLP)
            out[n] = (idx, "block")
            continue
        short = suffix.rsplit(".", 1)[-1]
        out[n] = (idx, short if len(last[short]) == 1 else suffix)
    return out


# -- the analysis -------------------------------------------------------------------------------------------
def _units(pruner: Pruner) -> list[tuple[str, list[str]]]:
    """(unit name, param names it masks): one per layer, or one per MLP block for channels."""
    if pruner.blocks:
        units = []
        for b in pruner.blocks:
            params = [ly.param_name for ly in (*b.inputs, b.output)]
            params += [f"{ly.name}.bias" for ly in b.inputs if getattr(ly.module, "bias", None) is not None]
            units.append((b.name, params))
        return units
    return [(ly.name, [ly.param_name]) for ly in pruner.layers]


def _unit_stats(pruner: Pruner, scores: dict[str, torch.Tensor], unit: str, outlier_m: float) -> tuple[float, float]:
    if pruner.blocks:
        block = next(b for b in pruner.blocks if b.name == unit)
        names = [ly.name for ly in (*block.inputs, block.output)]
    else:
        names = [unit]
    flat = torch.cat([scores[n].flatten().double() for n in names])
    mean = flat.mean().item()
    # OWL counts outliers per layer against that layer's own mean; for a block, per projection, pooled.
    outliers = sum(int((scores[n] > outlier_m * scores[n].double().mean()).sum()) for n in names)
    return outliers / flat.numel(), mean


class _HeldoutKL:
    """KL(teacher‖model) and top-1 on fixed held-out ids; the teacher's log-probs are computed once when they fit."""

    def __init__(self, model: nn.Module, heldout: torch.Tensor, batch_size: int, device):
        self.model, self.batches, self.device = model, list(heldout.split(batch_size)), device
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 0
        self.cache = [self._logp(ids) for ids in self.batches] if heldout.numel() * vocab <= _CACHE_FLOATS else None

    @torch.no_grad()
    def _logp(self, ids):
        return log_softmax_torch(self.model(input_ids=ids.to(self.device)).logits.float())

    @torch.no_grad()
    def cached(self) -> tuple[float, float]:
        """KL and top-1 of the model as it is now against the cached teacher log-probs."""
        kl_sum = agree = count = 0.0
        for logp, ids in zip(self.cache, self.batches, strict=True):
            logq = self._logp(ids)
            kl_sum += kl_torch(logp, logq).sum().item()
            agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
            count += ids.numel()
        return kl_sum / count, agree / count


@torch.no_grad()
def analyze_model(model: nn.Module, pattern: Pattern | str, calib: torch.Tensor, heldout: torch.Tensor, *,
                  importance: str = "wanda", include=("*",), exclude=DEFAULT_EXCLUDE, batch_size: int = 8,
                  outlier_m: float = 5.0, progress: Progress | None = None, teacher: str = "",
                  data: dict | None = None) -> LoadPathReport:
    """The analysis on a loaded model (left unchanged): ``calib`` / ``heldout`` are [N, L] token ids for the importance
    scores and the KL. ``analyze`` is the same from a model dir, with the data made as distill makes it."""
    pattern = make_pattern(pattern) if isinstance(pattern, str) else pattern
    if not prunable_layers(model, include, exclude):
        raise LoadPathError(f"no prunable layer in {teacher or 'the model'}: no Linear/Conv1D layer matches "
                            f"include {list(include)} minus exclude {list(exclude)}")
    if importance == "taylor":
        raise LoadPathError("load-path analysis scores with magnitude or wanda (taylor needs a KD loss against a "
                            "student, and here the teacher is its own reference)")
    began = time.perf_counter()
    model.eval()
    device = next(model.parameters()).device
    pruner = Pruner(model, pattern, include, exclude)
    scores = score(importance, ScoringContext(model, pruner.layers, list(calib.split(batch_size))))
    masks = pruner.stage_masks(scores, 1.0)
    params = dict(model.named_parameters(remove_duplicate=False))
    measure = _HeldoutKL(model, heldout, batch_size, device)
    units = _units(pruner)
    kinds = layer_kinds([u for u, _ in units])
    layers = []
    for i, (unit, names) in enumerate(units):
        saved = {n: params[n].detach().clone() for n in names}
        try:
            for n in names:
                params[n].mul_(masks[n].to(device=params[n].device, dtype=params[n].dtype))
            zeros = sum(int((params[n] == 0).sum()) for n in names if n.endswith(".weight"))
            total = sum(params[n].numel() for n in names if n.endswith(".weight"))
            if measure.cache is not None:
                kl, top1 = measure.cached()
            else:  # too large to cache: the teacher's log-probs are recomputed per batch with the unit restored
                kl, top1 = _kl_uncached(model, params, names, saved, masks, measure)
        finally:
            for n, w in saved.items():
                params[n].copy_(w)
        outlier, mean = _unit_stats(pruner, scores, unit, outlier_m)
        idx, kind = kinds[unit]
        kind = "mlp" if pruner.blocks else kind
        layers.append(LayerLoad(unit, kind, idx, total, max(kl, 0.0), top1, zeros / total, outlier, mean))
        if progress is not None:
            progress(i + 1, len(units), unit)
    return LoadPathReport(teacher=teacher, weights_digest=None, pattern=pattern.spec, importance=importance,
                          outlier_m=outlier_m, data=data or {"calib": len(calib), "heldout": len(heldout)},
                          layers=layers, seconds=round(time.perf_counter() - began, 2), skipped=dict(pruner.skipped))


def _kl_uncached(model, params, names, saved, masks, measure: _HeldoutKL) -> tuple[float, float]:
    kl_sum = agree = count = 0.0
    for ids in measure.batches:
        for n, w in saved.items():
            params[n].copy_(w)
        logp = measure._logp(ids)
        for n in names:
            params[n].mul_(masks[n].to(device=params[n].device, dtype=params[n].dtype))
        logq = measure._logp(ids)
        kl_sum += kl_torch(logp, logq).sum().item()
        agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
        count += ids.numel()
    return kl_sum / count, agree / count


def analysis_data(teacher: nn.Module, tokenizer, data: str | Path | None, seq_len: int, calib_samples: int,
                  heldout_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(calib, heldout, description): data-free samples from the teacher (seeded, as distill draws them), or a
    seeded split of ``data``'s sequences."""
    from ..models.loading import max_positions
    from .teacher import sample_teacher_data, tokenize_file

    max_pos = max_positions(teacher.config)
    if max_pos and seq_len > max_pos:
        raise DataError(f"seq_len {seq_len} exceeds the teacher's {max_pos} positions")
    desc = {"source": "teacher samples" if data is None else str(data), "seq_len": seq_len, "seed": seed}
    if data is None:
        seqs = sample_teacher_data(teacher, tokenizer, calib_samples + heldout_samples, seq_len, seed)
        calib, held = seqs[:calib_samples], seqs[calib_samples:]
    else:
        seqs = tokenize_file(Path(data), tokenizer, seq_len, teacher.get_input_embeddings().num_embeddings)
        if len(seqs) < 2:
            raise DataError(f"data {data} gives {len(seqs)} sequence(s) of {seq_len} tokens; the analysis needs at "
                            "least 2 (calibration + held-out); add text or lower --seq-len")
        perm = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))]
        n_held = max(1, min(heldout_samples, len(seqs) // 2))
        held, calib = perm[:n_held], perm[n_held:n_held + calib_samples]
    desc.update(calib=len(calib), heldout=len(held))
    return calib, held, desc


def analyze(teacher_dir: str | Path | None, pattern: str = "2:4", data: str | Path | None = None, *,
            tokenizer_dir: str | Path | None = None, importance: str = "wanda", include=("*",),
            exclude=DEFAULT_EXCLUDE, seq_len: int = 128, calib_samples: int = 32, heldout_samples: int = 32,
            batch_size: int = 8, seed: int = 0, outlier_m: float = 5.0,
            progress: Progress | None = None) -> LoadPathReport:
    """Load-path analysis of a teacher dir (``None``/"demo": the demo teacher), stamped with its weights digest."""
    from ..models.loading import load_model, load_tokenizer, resolve_teacher

    pat = make_pattern(pattern)
    for name, v in (("seq_len", seq_len), ("calib_samples", calib_samples), ("heldout_samples", heldout_samples),
                    ("batch_size", batch_size)):
        if v < 1 or (name == "seq_len" and v < 2):
            raise LoadPathError(f"{name} must be ≥ {2 if name == 'seq_len' else 1}, got {v}")
    if not (math.isfinite(outlier_m) and outlier_m > 0):
        raise LoadPathError(f"outlier_m must be > 0, got {outlier_m}")
    path = resolve_teacher(None if teacher_dir is None else str(teacher_dir))
    model = load_model(path, role="teacher")
    tokenizer = load_tokenizer(path, tokenizer_dir, required=data is not None)
    if not prunable_layers(model, include, exclude):  # before sampling any data
        raise LoadPathError(f"no prunable layer in teacher {path}: no Linear/Conv1D layer matches "
                            f"--include {' '.join(include)} minus --exclude {' '.join(exclude)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calib, held, desc = analysis_data(model, tokenizer, data, seq_len, calib_samples, heldout_samples, seed)
    model.to(device)
    report = analyze_model(model, pat, calib, held, importance=importance, include=include, exclude=exclude,
                           batch_size=batch_size, outlier_m=outlier_m, progress=progress, teacher=str(path), data=desc)
    report.weights_digest = weights_digest(path)
    return report


# -- files ----------------------------------------------------------------------------------------------------
def check_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and prove a file can be written there, before an analysis spends minutes."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LoadPathError(f"--out {out} is a file; pass a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LoadPathError(f"--out {out} is not writable ({e.strerror or e}); pass another --out") from None
    return out


def write_report(report: LoadPathReport, out_dir: str | Path) -> dict[str, Path]:
    """``loadpaths.json`` and the heat map ``loadpaths.png`` in ``out_dir``; returns their paths."""
    out = check_writable(out_dir)
    js, png = out / JSON_NAME, out / PNG_NAME
    write_json_atomic(js, report.to_dict())
    tmp = png.with_name(f".{png.name}.{os.getpid()}.png")
    try:
        plot_heatmap(report, tmp)
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return {"json": js, "png": png}


def analyze_to(out_dir: str | Path, teacher_dir: str | Path | None, pattern: str = "2:4", **kwargs
               ) -> tuple[LoadPathReport, dict[str, Path]]:
    """``analyze`` + ``write_report``, with ``out_dir`` checked before the analysis runs (the ``analyze`` command)."""
    check_writable(out_dir)
    report = analyze(teacher_dir, pattern, **kwargs)
    return report, write_report(report, out_dir)


def load_report(path: str | Path, teacher_dir: str | Path, pattern: str | None = None) -> LoadPathReport:
    """Read a loadpaths.json for ``teacher_dir`` (and ``pattern`` when given); one made from other weights or
    another pattern is refused, naming both."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    if not path.is_file():
        raise LoadPathError(f"load-path file {path} does not exist; make one with "
                            f"`sparsekd-deploy analyze --teacher {teacher_dir}`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise ValueError
        report = LoadPathReport.from_dict(raw)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise LoadPathError(f"{path} is not a loadpaths.json written by `sparsekd-deploy analyze`") from None
    digest = weights_digest(teacher_dir)
    if report.weights_digest != digest:
        raise LoadPathError(f"{path} was made from teacher {report.teacher} (weights {str(report.weights_digest)[:12]}), "
                            f"not from teacher {teacher_dir} (weights {digest[:12]}); rerun `sparsekd-deploy analyze "
                            f"--teacher {teacher_dir}`")
    if pattern is not None and make_pattern(pattern).spec != report.pattern:
        raise LoadPathError(f"{path} measured pattern {report.pattern}, but this run prunes to "
                            f"{make_pattern(pattern).spec}; rerun `sparsekd-deploy analyze --pattern "
                            f"{make_pattern(pattern).spec}`")
    return report


def plot_heatmap(report: LoadPathReport, path: Path) -> Path:
    """Block index × module kind: single-unit KL (log colour scale) and OWL outlier ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    blocks = sorted({ly.block for ly in report.layers if ly.block is not None})
    extra = sorted({ly.name for ly in report.layers if ly.block is None})
    rows = [str(b) for b in blocks] + extra
    kinds = list(dict.fromkeys(ly.kind for ly in report.layers if ly.block is not None)) or ["layer"]
    kl = torch.full((len(rows), len(kinds)), float("nan"))
    outl = kl.clone()
    for ly in report.layers:
        r = rows.index(str(ly.block)) if ly.block is not None else rows.index(ly.name)
        c = kinds.index(ly.kind) if ly.block is not None else 0
        kl[r, c], outl[r, c] = ly.kl, ly.outlier_ratio
    pos = kl[kl > 0]
    fig, axes = plt.subplots(1, 2, figsize=(2 * (3.2 + 0.8 * len(kinds)), 2.4 + 0.4 * len(rows)), squeeze=False,
                             layout="constrained")
    for ax, m, title, norm, fmt in (
        (axes[0, 0], kl, f"KL with only this unit pruned to {report.pattern}",
         LogNorm(vmin=pos.min().item(), vmax=pos.max().item()) if len(pos) and pos.min() < pos.max() else None, "{:.2g}"),
        (axes[0, 1], outl, f"outlier ratio (>{report.outlier_m:g}× mean {report.importance})", None, "{:.1%}"),
    ):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="magma_r" if ax is axes[0, 0] else "viridis", norm=norm)
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_ylabel("block")
        ax.set_title(title, fontsize=9)
        if len(rows) * len(kinds) <= 200:
            for r in range(len(rows)):
                for c in range(len(kinds)):
                    v = m[r, c].item()
                    if not math.isnan(v):
                        level = float(im.norm(v))  # magma_r is dark at the top, viridis at the bottom
                        dark = level > 0.5 if ax is axes[0, 0] else level < 0.5
                        ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                                color="white" if dark else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"load paths of {Path(report.teacher).name or report.teacher}", fontsize=10)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def unit_name_of(report: LoadPathReport, layer_name: str) -> str | None:
    """The report's unit holding a layer (itself, or its MLP block for a channels report)."""
    names = report.by_name()
    if layer_name in names:
        return layer_name
    return next((n for n in names if layer_name.startswith(n + ".")), None)


def is_channels(report: LoadPathReport) -> bool:
    return isinstance(make_pattern(report.pattern), Channels)


__all__ = ["LayerLoad", "LoadPathError", "LoadPathReport", "analyze", "analyze_model", "analyze_to", "layer_kinds",
           "load_report", "plot_heatmap", "write_report", "JSON_NAME", "PNG_NAME"]
