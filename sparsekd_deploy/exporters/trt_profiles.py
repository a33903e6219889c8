"""Optimization profiles for decoder graphs (batch / sequence / past length) and the on-device build step.

The KV-cache graph's inputs: input_ids, position_ids [batch, seq]; attention_mask [batch, past + seq];
past_key_values.N.{key,value} [batch, heads, past, head_dim]. One (min, opt, max) per axis fixes all of them.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, name: str, text: str) -> Range:
        try:
            parts = [int(x) for x in str(text).split(",")]
        except ValueError:
            raise ConfigError([f"profile {name}: {text!r} is not MIN,OPT,MAX (whole numbers)"]) from None
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise ConfigError([f"profile {name}: give MIN,OPT,MAX (or one number), got {text!r}"])
        return cls(*parts)

    def problems(self, name: str, lowest: int) -> list[str]:
        p = []
        if self.min < lowest:
            p.append(f"profile {name}: min {self.min} is below {lowest}")
        if self.min > self.opt:
            p.append(f"profile {name}: min {self.min} > opt {self.opt} (need min ≤ opt ≤ max)")
        if self.opt > self.max:
            p.append(f"profile {name}: opt {self.opt} > max {self.max} (need min ≤ opt ≤ max)")
        return p


@dataclass(frozen=True)
class Profile:
    batch: Range = Range(1, 1, 4)
    seq: Range = Range(1, 128, 512)
    past: Range = Range(0, 128, 512)

    @classmethod
    def from_cli(cls, batch: str | None, seq: str | None, past: str | None, max_positions: int | None) -> Profile:
        """Axes the user leaves out follow the model: sequence + past never exceed its positions, and a decode
        engine keeps room for a past (half the positions when neither axis is given)."""
        d = cls()
        b = Range.parse("batch", batch) if batch else d.batch
        s = Range.parse("seq", seq) if seq else None
        p = Range.parse("past", past) if past else None
        if max_positions:
            if s is None:
                s_max = min(d.seq.max, max_positions - p.max if p else max_positions // 2)
                s = Range(1, min(d.seq.opt, s_max), s_max) if s_max >= 1 else d.seq  # else check() says why
            if p is None:
                p_max = max(0, min(d.past.max, max_positions - s.max))
                p = Range(0, min(d.past.opt, p_max), p_max)
        prof = cls(b, s or d.seq, p or d.past)
        prof.check(max_positions)
        return prof

    def check(self, max_positions: int | None = None) -> None:
        problems = self.batch.problems("batch", 1) + self.seq.problems("seq", 1) + self.past.problems("past", 0)
        if max_positions and self.seq.max + self.past.max > max_positions:
            problems.append(f"profile seq max {self.seq.max} + past max {self.past.max} exceeds the model's "
                            f"{max_positions} positions")
        if problems:
            raise ConfigError(problems)

    def shapes(self, inputs: dict[str, list]) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shape per graph input; ``inputs`` maps input name -> its ONNX dims (ints or names)."""
        out = {}
        for name, dims in inputs.items():
            per = []
            for which in ("min", "opt", "max"):
                b, s, p = getattr(self.batch, which), getattr(self.seq, which), getattr(self.past, which)
                if name.startswith("past_key_values."):
                    shape = (b, int(dims[1]), p, int(dims[3]))
                elif name == "attention_mask":
                    shape = (b, p + s)
                else:
                    shape = (b, s)
                per.append(shape)
            out[name] = tuple(per)
        return out

    def to_dict(self) -> dict:
        return {k: asdict(v) for k, v in (("batch", self.batch), ("seq", self.seq), ("past", self.past))}

    @classmethod
    def from_trtexec_shapes(cls, shapes: dict[str, dict[str, list[int]]]) -> Profile | None:
        """The profile a trtexec command really used (``--minShapes/--optShapes/--maxShapes`` → per-axis ranges),
        or None when it did not name ``input_ids``. Past length comes from the first past key, when present."""
        try:
            ids = [shapes[w]["input_ids"] for w in ("min", "opt", "max")]
        except KeyError:
            return None
        past_name = next((n for n in shapes["max"] if n.startswith("past_key_values.")), None)
        past = [shapes[w][past_name][2] for w in ("min", "opt", "max")] if past_name else [0, 0, 0]
        return cls(Range(*(d[0] for d in ids)), Range(*(d[1] for d in ids)), Range(*past))


def trtexec_argv(onnx: str, engine: str, shapes: dict, *, trt_major: int, fp16: bool, sparse: bool,
                 workspace_mib: int, timing_cache: str, layer_info: str, precision: str | None = None) -> list[str]:
    """The exact trtexec command for the device (an argv list: it never passes through a shell). ``precision``: a
    quantized one (int8, fp8, int4-weight) when ``onnx`` is the bundle's Q/DQ graph; else fp16 / fp32 per ``fp16``.
    The precision switches are ``trt_precision.choose``'s, the same the Python builder sets as flags."""
    from .trt_precision import choose

    chosen = choose(precision or ("fp16" if fp16 else "fp32"), trt_major=trt_major, sparse=sparse, fp16_graph=onnx,
                    quantized_graph=onnx, fp32_graph=onnx)

    def fmt(i):
        return ",".join(f"{n}:{'x'.join(str(d) for d in s[i])}" for n, s in shapes.items())

    argv = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}", f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}",
            f"--maxShapes={fmt(2)}", f"--memPoolSize=workspace:{workspace_mib}M", "--profilingVerbosity=detailed",
            f"--exportLayerInfo={layer_info}", f"--timingCacheFile={timing_cache}", "--verbose"]
    # TensorRT 11: --stronglyTyped (precision from the graph itself); 10.x: --fp16 / --int8 / --fp8 / --int4.
    return argv + list(chosen.trtexec)


def shell_line(argv: list[str]) -> str:
    """For display / a script file only; quoted so a path with spaces stays one argument."""
    return " ".join(shlex.quote(a) for a in argv)
