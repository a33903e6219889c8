"""Which causal attention ONNX Runtime's CPU provider runs fastest, at the issue-13 prefill's shape (one 512-token
prompt, 16 heads of 64, fp32): the bound attention puts on the int8 / fp32 prefill ratio (README, quantization).

One layer's attention as a one-node graph, each variant on the same Q / K / V, medians of timed runs, side by side:

- ``MultiHeadAttention`` + additive bias [B, 1, S, T] — what ``exporters/ort_attention.py``'s rewrite makes;
- the same node with its queries in blocks (``exporters/ort_query_blocks.py``, the product's own pass, its defaults):
  what the onnxruntime target's graphs run for prompts of 256 tokens and more;
- ``MultiHeadAttention`` + 2-D key-padding mask + ``unidirectional=1`` (the causal mask made inside the kernel);
- ``MultiHeadAttention`` + ``unidirectional=1`` alone;
- ``GroupQueryAttention`` (causal by definition; K / V as [B, S, H*Dh]);
- the standard ONNX ``Attention`` (opset 23) with ``is_causal=1`` (Q / K / V as [B, N, S, Dh]);
- ``MultiHeadAttention`` with no mask at all — **not causal**, so not a candidate: it is the only variant that takes
  ORT's CPU flash-attention path (its condition: no mask, no bias, not unidirectional, no past / present), shown for
  what a causal flash kernel could save.

Every causal variant's output is compared with the first's.

    .venv/bin/python scripts/bench_ort_attention.py [--seq 512] [--heads 16] [--head-size 64] [--threads 2]
        [--provider cuda]   # on a GPU with onnxruntime-gpu: does the query-block Loop cost there? (device_check.sh)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _graph(op: str, inputs: list[tuple[str, int, list]], node_inputs: list[str], outputs: list[str],
           domain: str = "com.microsoft", **attrs) -> bytes:
    from onnx import helper

    node = helper.make_node(op, node_inputs, outputs, domain=domain, **attrs)
    graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(outputs[0], 1, None)])
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _query_blocks(graph: bytes) -> bytes:
    import onnx

    from sparsekd_deploy.exporters.ort_query_blocks import block_queries

    model = onnx.load_from_string(graph)
    block_queries(model)
    return model.SerializeToString()


def variants(s: int, n: int, d: int):
    """(name, graph, extra feeds, causal) for each variant; Q [1, S, N*D], K / V [1, N, S, D] as in our graphs."""
    from onnx import TensorProto as T

    qkv = [("q", T.FLOAT, [1, s, n * d]), ("k", T.FLOAT, [1, n, s, d]), ("v", T.FLOAT, [1, n, s, d])]
    attrs = dict(num_heads=n, scale=float(d) ** -0.5)
    bias = np.triu(np.full((s, s), np.finfo(np.float32).min, np.float32), 1)[None, None]
    plain = _graph("MultiHeadAttention", qkv + [("bias", T.FLOAT, [1, 1, s, s])], ["q", "k", "v", "", "", "bias"],
                   ["out"], **attrs)
    yield "MHA + additive bias", plain, {"bias": bias}, True
    yield "MHA + bias, query blocks (ours)", _query_blocks(plain), {"bias": bias}, True
    yield ("MHA + padding mask + unidirectional",
           _graph("MultiHeadAttention", qkv + [("pad", T.INT32, [1, s])], ["q", "k", "v", "", "pad"], ["out"],
                  unidirectional=1, **attrs), {"pad": np.ones((1, s), np.int32)}, True)
    yield ("MHA + unidirectional",
           _graph("MultiHeadAttention", qkv, ["q", "k", "v"], ["out"], unidirectional=1, **attrs), {}, True)
    gqa_in = [("q", T.FLOAT, [1, s, n * d]), ("k_bsh", T.FLOAT, [1, s, n * d]), ("v_bsh", T.FLOAT, [1, s, n * d]),
              ("seqlens_k", T.INT32, [1]), ("total", T.INT32, [])]
    yield ("GroupQueryAttention",
           _graph("GroupQueryAttention", gqa_in, ["q", "k_bsh", "v_bsh", "", "", "seqlens_k", "total"],
                  ["out", "present_k", "present_v"], kv_num_heads=n, **attrs),
           {"seqlens_k": np.array([s - 1], np.int32), "total": np.array(s, np.int32)}, True)
    bnsh = [("q_bnsh", T.FLOAT, [1, n, s, d]), ("k", T.FLOAT, [1, n, s, d]), ("v", T.FLOAT, [1, n, s, d])]
    yield ("ONNX Attention-23, is_causal=1",
           _graph("Attention", bnsh, ["q_bnsh", "k", "v"], ["out_bnsh"], domain="", is_causal=1,
                  scale=float(d) ** -0.5), {}, True)
    yield ("MHA, no mask (flash path; NOT causal)",
           _graph("MultiHeadAttention", qkv, ["q", "k", "v"], ["out"], **attrs), {}, False)


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--layers", type=int, default=8, help="to scale one layer's time to the model's")
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[args.provider]
    if provider not in ort.get_available_providers():
        print(f"{provider} is not in this onnxruntime ({ort.get_device()}): nothing measured")
        return
    s, n, d = args.seq, args.heads, args.head_size
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, s, n * d), dtype=np.float32)
    k, v = (rng.standard_normal((1, n, s, d), dtype=np.float32) for _ in range(2))
    bsh = {"k_bsh": k.transpose(0, 2, 1, 3).reshape(1, s, n * d).copy(),
           "v_bsh": v.transpose(0, 2, 1, 3).reshape(1, s, n * d).copy(),
           "q_bnsh": q.reshape(1, s, n, d).transpose(0, 2, 1, 3).copy()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    print(f"one layer's attention, 1 x {s} tokens, {n} heads of {d}, fp32, {provider}, {args.threads} threads, "
          f"medians of {args.runs} runs")
    print(f"{'variant':40s} {'ms / layer':>10s} {'x' + str(args.layers) + ' layers':>11s} {'x first':>7s}  max |diff|")
    reference, first_ms = None, None
    for name, graph, extra, causal in variants(s, n, d):
        try:
            session = ort.InferenceSession(graph, opts, providers=[provider])
        except Exception as e:  # a variant this provider has no kernel for
            print(f"{name:40s} not run: {str(e).splitlines()[0][:80]}")
            continue
        wanted = {i.name for i in session.get_inputs()}
        feeds = {key: val for key, val in {"q": q, "k": k, "v": v, **bsh, **extra}.items() if key in wanted}
        first = session.get_outputs()[0].name
        for _ in range(3):
            out = session.run([first], feeds)[0]
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = session.run([first], feeds)[0]
            times.append(time.perf_counter() - t0)
        if first == "out_bnsh":  # [B, N, S, Dh] -> the others' [B, S, N*Dh]
            out = out.transpose(0, 2, 1, 3).reshape(1, s, n * d)
        ms = statistics.median(times) * 1e3
        reference = out if reference is None else reference
        first_ms = ms if first_ms is None else first_ms
        diff = f"{np.abs(out - reference).max():.1e}" if causal else "(not causal)"
        print(f"{name:40s} {ms:10.2f} {ms * args.layers:11.1f} {ms / first_ms:7.2f}  {diff}")


if __name__ == "__main__":
    main()
