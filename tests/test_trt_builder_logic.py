"""The engine builder's decisions, checked against a recording stand-in for the `tensorrt` module.

The stand-in only records calls: it proves which flags, profiles and graphs our code asks TensorRT for on each
version and device, not that TensorRT builds anything (that is the tensorrt-marked GPU tests' job).
"""

import json
import sys
import types

import pytest

from sparsekd_deploy.exporters import tensorrt as builder_mod
from sparsekd_deploy.exporters.trt_profiles import Profile


def fake_trt(version: str, calls: list, parse_ok: bool = True):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class ILogger:
        VERBOSE, INFO, WARNING, ERROR = range(4)

        def __init__(self):
            pass

    class Flag:
        FP16, SPARSE_WEIGHTS, INT8, FP8, INT4 = "FP16", "SPARSE_WEIGHTS", "INT8", "FP8", "INT4"

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self):
            self.inputs = [Tensor("input_ids", [-1, -1]), Tensor("attention_mask", [-1, -1]),
                           Tensor("past_key_values.0.key", [-1, 4, -1, 64])]
            self.num_inputs = len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            self.logger = logger

        def parse_from_file(self, path):
            calls.append(("parse", path.rsplit("/", 1)[-1]))
            if not parse_ok:
                self.logger.log(ILogger.ERROR, "No checker registered for op: grid_sampler. Attempting to check as plugin.")
            return parse_ok

        def get_error(self, i):
            return "In node 3 (importGridSampler): UNSUPPORTED_NODE"

    class Profile_:
        def set_shape(self, name, mn, op, mx):
            calls.append(("shape", name, mn, op, mx))

    class Cache:
        def serialize(self):
            return b"cache"

    class Config:
        profiling_verbosity = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def add_optimization_profile(self, p):
            pass

        def create_timing_cache(self, data):
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return Cache()

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile_()

        def build_serialized_network(self, network, config):
            self.logger.log(ILogger.VERBOSE, "(Sparsity) Found 2 layer(s) eligible to use sparse tactics: mm_0, mm_1")
            self.logger.log(ILogger.VERBOSE, "(Sparsity) Chose 1 layer(s) using sparse tactics: mm_1")
            return b"\x00" * 24 + bytes([10, 16, 1]) + b"\x00" * 10

    class Inspector:
        def get_engine_information(self, fmt):
            return json.dumps({"Layers": [{"Name": "mm_1", "TacticName": "sm80_xmma_gemm_sparse_f16", "HasSparseWeights": 1}]})

    class Engine:
        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine()

    trt.ILogger, trt.BuilderFlag, trt.OnnxParser, trt.Builder, trt.Runtime = ILogger, Flag, Parser, Builder, Runtime
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    return trt


@pytest.fixture
def machine(monkeypatch):
    def set_machine(cc, version):
        info = {"tensorrt_version": version, "compute_capability": cc, "cuda_version": "12.6", "device_name": "GPU"}
        monkeypatch.setattr(builder_mod, "this_machine", lambda: info)

    return set_machine


def run_build(tmp_path, monkeypatch, version, parse_ok=True, fp16_graph=True, **kw):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(version, calls, parse_ok))
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "model.fp16.onnx").write_bytes(b"x")
    res = builder_mod.build_engine(tmp_path / "model.onnx", tmp_path / "model.fp16.onnx" if fp16_graph else None,
                                   tmp_path / "out", Profile(), **kw)
    return res, calls


def test_trt10_fp16_flag_on_fp32_graph_with_sparse_weights(tmp_path, monkeypatch, machine):
    machine("8.7", "10.16.1")
    res, calls = run_build(tmp_path, monkeypatch, "10.16.1")
    assert ("parse", "model.onnx") in calls
    assert ("flag", "FP16") in calls and ("flag", "SPARSE_WEIGHTS") in calls
    assert ("workspace", 4096 << 20) in calls
    assert ("shape", "past_key_values.0.key", (1, 4, 0, 64), (1, 4, 128, 64), (4, 4, 512, 64)) in calls
    assert res.engine["precision"] == "fp16" and not res.engine["strongly_typed"]
    assert res.sparsity["summary"] == "2 layer(s) eligible, 1 picked a sparse tactic"
    assert (tmp_path / "out" / "engine.plan").is_file() and (tmp_path / "out" / "engine.build.log").is_file()


def test_trt11_is_strongly_typed_and_parses_the_fp16_graph(tmp_path, monkeypatch, machine):
    machine("9.0", "11.0.0")
    res, calls = run_build(tmp_path, monkeypatch, "11.0.0")
    assert ("parse", "model.fp16.onnx") in calls and ("flag", "FP16") not in calls
    assert res.engine["strongly_typed"] and res.engine["onnx"] == "model.fp16.onnx"


def test_trt11_fp16_without_an_fp16_graph_is_refused(tmp_path, monkeypatch, machine):
    machine("9.0", "11.0.0")
    with pytest.raises(builder_mod.EngineBuildError, match="TensorRT 11 builds FP16 only from an FP16 ONNX graph"):
        run_build(tmp_path, monkeypatch, "11.0.0", fp16_graph=False)


def test_pre_ampere_gpu_builds_dense_and_says_so(tmp_path, monkeypatch, machine):
    machine("7.5", "10.16.1")
    res, calls = run_build(tmp_path, monkeypatch, "10.16.1")
    assert ("flag", "SPARSE_WEIGHTS") not in calls
    assert res.warnings and "no sparse tensor cores" in res.warnings[0] and not res.engine["sparse_weights"]


def test_parser_errors_are_shown(tmp_path, monkeypatch, machine):
    machine("8.7", "10.16.1")
    with pytest.raises(builder_mod.EngineBuildError, match="cannot parse model.onnx: unsupported ONNX op grid_sampler"):
        run_build(tmp_path, monkeypatch, "10.16.1", parse_ok=False)


def test_without_tensorrt_the_message_says_build_on_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(builder_mod.TensorRTUnavailableError, match="engine build BUNDLE"):
        builder_mod.import_tensorrt()
