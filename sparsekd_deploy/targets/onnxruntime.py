"""ONNX Runtime target: CPU, CUDA or TensorRT execution provider, with the KV cache when the graph has one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import first_line
from ..exporters.decoder_feeds import session_caches, step_feed
from ..exporters.ort_attention import POSITIONS_KEY
from .base import TARGETS, DecodeState, Target, TargetError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def provider_config(provider: str, fp16: bool = False, cache_dir: str | None = None) -> list:
    """The provider list for a session, or a clear error when this onnxruntime build lacks it."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise TargetError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        hint = {"cuda": "install onnxruntime-gpu (and CUDA)", "tensorrt": "install onnxruntime-gpu built with TensorRT"}
        raise TargetError(f"provider {provider} ({name}) is not available in onnxruntime {ort.__version__} "
                          f"(available: {', '.join(available)}); {hint.get(provider, '')}".rstrip("; "))
    if provider == "tensorrt":
        opts = {"trt_sparsity_enable": True, "trt_fp16_enable": fp16, "trt_engine_cache_enable": cache_dir is not None}
        if cache_dir:
            opts["trt_engine_cache_path"] = cache_dir
        return [(name, opts), "CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cuda":
        return [name, "CPUExecutionProvider"]
    return [name]


@TARGETS.register("onnxruntime")
class OnnxRuntimeTarget(Target):
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, provider: str = "cpu", fp16: bool = False, threads: int | None = None,
                 max_positions: int | None = None, cache_dir: str | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=provider_config(provider, fp16, cache_dir))
        except TargetError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
            raise TargetError(f"onnxruntime cannot load {model_path}: {first_line(e)}") from None
        self.provider = provider
        self.path = Path(model_path)
        # A graph with ORT's fused rotary runs only the positions its caches hold (fused for the onnxruntime
        # target: the model's max_position_embeddings); past them onnxruntime fails mid-run, so refuse up front.
        rows = self.session.get_modelmeta().custom_metadata_map.get(POSITIONS_KEY)
        if rows is not None and not (rows.isdigit() and int(rows) > 0):  # a hand-edited or damaged graph
            raise TargetError(f"{model_path}: its metadata {POSITIONS_KEY}={rows!r} is not a positive position count "
                              "(the fused rotary's cache rows); re-export the bundle's graph")
        limits = [int(x) for x in (max_positions, rows) if x]
        self.max_positions = min(limits) if limits else None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.caches = session_caches(self.inputs)
        self.past_names = list(self.caches)
        self.present_for = {n: n.replace("past_key_values.", "present.") for n in self.past_names}
        logits_out = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab_size = logits_out.shape[-1] if isinstance(logits_out.shape[-1], int) else None

    @property
    def has_kv_cache(self) -> bool:
        return bool(self.past_names)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"runtime": "onnxruntime", "version": ort.__version__, "provider": self.provider,
                "providers": self.session.get_providers(), "kv_cache": self.has_kv_cache}

    def _forward(self, ids, past, past_len):
        try:
            outs = self.session.run(None, step_feed(ids, past_len, self.inputs, self.caches, past))
        except Exception as e:  # onnxruntime's own error types (a graph that cannot run these inputs): one line
            raise TargetError(f"onnxruntime failed running {self.path.name}: {first_line(e)}") from None
        named = dict(zip([o.name for o in self.session.get_outputs()], outs, strict=True))
        new_past = {p: named[self.present_for[p]] for p in self.past_names} if self.past_names else None
        # copy=False: an fp32 graph's logits are returned as ORT wrote them (copying 1 x 512 x 32000
        # floats took 14 ms here, in every fp32 and quantized prefill alike)
        return named["logits"].astype(np.float32, copy=False), new_past

    def _gather_past(self, past, rows):
        return {name: np.take(v, rows, axis=0) for name, v in past.items()}

    def _step(self, state, next_ids):
        if self.has_kv_cache:
            return super()._step(state, next_ids)
        ids = np.concatenate([state.ids, next_ids], 1)  # no cache: rerun the whole sequence
        return DecodeState(self._forward(ids, None, 0)[0][:, -1], None, ids)
