"""Per-layer speedup profile: does 2:4 pay for each layer at the shapes the user deploys, on this GPU?

TensorRT and cuSPARSELt time sparse kernels against dense ones; small GEMMs, small batches and GEMV-bound
decode often stay dense. ``profile`` measures every eligible layer dense vs 2:4 at batch × sequence tokens and
predicts the end-to-end gain; ``distill --sparsify-only-faster profile.json`` keeps the losers dense.
"""

from __future__ import annotations

import time
from pathlib import Path

from .core.speed_profile import ProfileError, slower_layers  # noqa: F401  (re-exported: profile's API)


def eligible_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Layer name -> (out, in) for every Linear/Conv1D that can carry 2:4 (in multiple of 4)."""
    from .models.adapters import prunable_layers
    from .models.loading import load_model

    model = load_model(Path(model_dir))
    return {ly.name: ly.shape_oi for ly in prunable_layers(model) if ly.shape_oi[1] % 4 == 0}


def predict(layers: dict[str, dict], e2e_dense_ms: float) -> dict:
    """End-to-end prediction: the dense run minus what each layer saves where its sparse kernel is faster."""
    saved = sum(max(0.0, v["dense_ms"] - v["sparse_ms"]) for v in layers.values())
    sparse_ms = max(e2e_dense_ms - saved, 1e-9)
    return {"dense_ms": e2e_dense_ms, "predicted_sparse_ms": sparse_ms, "predicted_speedup": e2e_dense_ms / sparse_ms,
            "layers_sparse": sum(v["speedup"] > 1.0 for v in layers.values()), "layers_total": len(layers)}


def _per_layer(shapes: dict[str, tuple[int, int]], by_shape: dict[tuple[int, int], dict]) -> dict:
    """Spread per-shape timings over the layers of that shape, with the dense/sparse speedup."""
    return {name: {"shape_out_in": list(s), **by_shape[s], "speedup": by_shape[s]["dense_ms"] / by_shape[s]["sparse_ms"]}
            for name, s in shapes.items()}


def _cuda_ms(fn, repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def time_layers_torch(shapes: dict[str, tuple[int, int]], tokens: int, dtype: str = "fp16", repeats: int = 50,
                      backend: str | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    from .targets.torch_cuda import semi_structured

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    by_shape: dict[tuple[int, int], dict] = {}
    for out_f, in_f in sorted(set(shapes.values())):
        x = torch.randn(tokens, in_f, dtype=dt, device="cuda")
        w = torch.randn(out_f, in_f, dtype=dt, device="cuda")
        w.view(-1, 4)[:, :2] = 0
        dense = _cuda_ms(lambda x=x, w=w: F.linear(x, w), repeats)
        try:
            ws = semi_structured(w, backend)
            sparse = _cuda_ms(lambda x=x, ws=ws: F.linear(x, ws), repeats)
        except (RuntimeError, ValueError):  # shape the kernels do not take: it stays dense
            sparse = float("inf")
        by_shape[(out_f, in_f)] = {"dense_ms": dense, "sparse_ms": sparse}
    return _per_layer(shapes, by_shape)


def time_model_torch(model_dir: Path, batch: int, seq: int, dtype: str = "fp16", repeats: int = 10) -> float:
    import torch

    from .models.loading import load_model

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = load_model(Path(model_dir)).to("cuda", dt).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    with torch.no_grad():
        return _cuda_ms(lambda: model(input_ids=ids, use_cache=False), repeats)


def time_layers_tensorrt(shapes: dict[str, tuple[int, int]], tokens: int, repeats: int = 50) -> dict:
    """One tiny FP16 engine per distinct shape, dense vs SPARSE_WEIGHTS, timed with CUDA events."""
    import numpy as np
    import torch

    from .exporters.tensorrt import import_tensorrt, trt_major

    trt = import_tensorrt("or time the layers with `--target torch` (PyTorch 2:4 kernels)")
    logger = trt.Logger(trt.Logger.ERROR)
    # FP16 I/O and weights only mean FP16 math in a strongly typed network: a weakly typed TensorRT 10 network
    # without BuilderFlag.FP16 may run the GEMM in FP32, where 2:4 has nothing to offer. 11.x is always strongly typed.
    flags = 0 if trt_major(trt) >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def engine_ms(out_f, in_f, sparse):
        builder = trt.Builder(logger)
        net = builder.create_network(flags)
        x = net.add_input("x", trt.float16, (tokens, in_f))
        w = np.random.default_rng(0).standard_normal((in_f, out_f)).astype(np.float16)
        w.reshape(in_f // 4, 4, out_f)[:, :2, :] = 0  # 2:4 along K, the reduction axis of x @ W
        const = net.add_constant((in_f, out_f), trt.Weights(w))
        mm = net.add_matrix_multiply(x, trt.MatrixOperation.NONE, const.get_output(0), trt.MatrixOperation.NONE)
        net.mark_output(mm.get_output(0))
        cfg = builder.create_builder_config()
        if sparse:
            cfg.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        plan = builder.build_serialized_network(net, cfg)
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        ctx = engine.create_execution_context()
        xi = torch.randn(tokens, in_f, dtype=torch.float16, device="cuda")
        yo = torch.empty(tokens, out_f, dtype=torch.float16, device="cuda")
        ctx.set_tensor_address("x", xi.data_ptr())
        ctx.set_tensor_address(engine.get_tensor_name(1), yo.data_ptr())
        stream = torch.cuda.current_stream().cuda_stream
        return _cuda_ms(lambda: ctx.execute_async_v3(stream), repeats)

    by_shape = {s: {"dense_ms": engine_ms(*s, False), "sparse_ms": engine_ms(*s, True)} for s in set(shapes.values())}
    return _per_layer(shapes, by_shape)


def profile(model_dir: Path, target: str, batch: int, seq: int, dtype: str = "fp16") -> dict:
    import torch

    if not torch.cuda.is_available():
        raise ProfileError("the speedup profile times kernels on the GPU you deploy to; no CUDA GPU is visible here")
    from .exporters.trt_compat import compute_capability, sparse_tensor_cores

    cc = compute_capability()
    if not sparse_tensor_cores(cc):
        raise ProfileError(f"this GPU (compute capability {cc}) has no 2:4 sparse tensor cores (they start at 8.0, "
                           "Ampere): 2:4 cannot pay here; `--pattern channels:S` shrinks the model instead")
    shapes = eligible_shapes(model_dir)
    if not shapes:
        raise ProfileError(f"{model_dir} has no layer that can carry 2:4")
    tokens = batch * seq
    start = time.time()
    layers = time_layers_torch(shapes, tokens, dtype) if target == "torch" else time_layers_tensorrt(shapes, tokens)
    e2e = time_model_torch(model_dir, batch, seq, dtype)
    return {
        "device": torch.cuda.get_device_name(), "compute_capability": cc,
        "target": target, "batch": batch, "seq": seq, "tokens": tokens, "dtype": dtype, "layers": layers,
        "end_to_end": predict(layers, e2e), "seconds": round(time.time() - start, 1),
    }
