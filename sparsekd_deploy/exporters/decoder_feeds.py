"""The inputs of one step of an exported decoder graph (optimum's names): ids, an all-ones attention mask over past +
new tokens, positions, and the KV cache (``past_key_values.N.{key,value}``, [batch, heads, past, head_dim]) — empty
for a prompt pass. In the exporters' layer because the export checks its own graphs with them (``ort_attention``'s
probe, the int8 calibration feeds) and the targets run every bundle's graph with the same ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CACHE_PREFIX = "past_key_values."
# onnxruntime's input types (``NodeArg.type``) of the tensors a decoder step feeds
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}


@dataclass(frozen=True)
class CacheInput:
    """One ``past_key_values.*`` input: what its empty (prompt-pass) tensor needs besides the batch."""

    heads: int
    dim: int
    dtype: type


def decoder_feed(ids: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
    """The non-cache inputs of a decoder step: ids, an all-ones attention mask over past + new, positions."""
    B, L = ids.shape
    return {"input_ids": ids, "attention_mask": np.ones((B, past_len + L), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + L, dtype=np.int64), (B, L)).copy()}


def session_caches(inputs: dict) -> dict[str, CacheInput]:
    """The cache inputs of an onnxruntime session, from its ``{name: NodeArg}``, in the session's order."""
    return {name: CacheInput(meta.shape[1], meta.shape[3], ORT_TYPES[meta.type])
            for name, meta in inputs.items() if name.startswith(CACHE_PREFIX)}


def graph_caches(graph) -> dict[str, CacheInput]:
    """The cache inputs of an ``onnx.GraphProto``, in the graph's order (read without loading any weights)."""
    import onnx

    return {i.name: CacheInput(i.type.tensor_type.shape.dim[1].dim_value, i.type.tensor_type.shape.dim[3].dim_value,
                               np.float16 if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32)
            for i in graph.input if i.name.startswith(CACHE_PREFIX)}


def step_feed(ids: np.ndarray, past_len: int, inputs, caches: dict[str, CacheInput],
              past: dict | None = None) -> dict[str, np.ndarray]:
    """A graph's whole feed for one step: the non-cache inputs it has (``inputs``: its input names; a graph may
    lack ``position_ids``), then each cache input from ``past``, or empty when there is none (a prompt pass)."""
    feed = {k: v for k, v in decoder_feed(ids, past_len).items() if k in inputs}
    for name, c in caches.items():
        feed[name] = past[name] if past is not None else np.zeros((ids.shape[0], c.heads, 0, c.dim), c.dtype)
    return feed
