"""The lean device-side install: `import sparsekd_deploy`, `--help`, `validate` (ONNX Runtime), `inspect` and `engine`
run without torch, transformers or matplotlib; the build-host commands say in one line to install `[full]`; the
TensorRT target gets device memory from cuda-python or torch, whichever is installed."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import LOOSE

from sparsekd_deploy import cuda_memory

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum", "accelerate", "matplotlib", "onnxscript")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


# Runs in a fresh interpreter: imports the device commands, then drives them, and reports which heavy packages were
# loaded after each phase. `block` simulates a lean install by making those imports fail.
PROBE = r"""
import json, sys
block, bundle, teacher = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
for name in block:
    sys.modules[name] = None
HEAVY = %r
def loaded():
    return sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in HEAVY})
phases = {}
import sparsekd_deploy, sparsekd_deploy.cli
import sparsekd_deploy.commands.validate, sparsekd_deploy.commands.inspect, sparsekd_deploy.commands.engine
phases["import"] = loaded()
from click.testing import CliRunner
from sparsekd_deploy.cli import main
codes = {}
def run(key, args):
    r = CliRunner().invoke(main, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), (key, repr(r.exception))
    codes[key] = [r.exit_code, r.output.strip().splitlines()[-1] if r.output.strip() else ""]
run("help", ["--help"])
run("validate", ["validate", bundle, "--no-plots", "--json", *%r])
run("inspect", ["inspect", bundle])
run("engine build", ["engine", "build", bundle])
run("engine add", ["engine", "add", bundle, "--plan", bundle + "/nope.plan"])
phases["device commands"] = loaded()
run("validate with plots", ["validate", bundle, *%r])
phases["validate with plots"] = loaded()
if block:
    run("distill", ["distill", "--teacher", bundle, "--out", bundle + "/../run"])
    run("validate --teacher", ["validate", bundle, "--teacher", teacher])
print(json.dumps({"phases": phases, "codes": codes}))
""" % (HEAVY, LOOSE, LOOSE)  # noqa: UP031  (the probe's own braces stay literal)


def _probe(bundle: Path, teacher: Path, block=()) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(block)), str(bundle), str(teacher)],
                       capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_device_commands_import_no_torch(ort_bundle, tiny_dirs, tmp_path):
    """In this full venv (torch installed), the device paths still never load torch, transformers or matplotlib."""
    res = _probe(_copy(ort_bundle, tmp_path), tiny_dirs["llama"])
    assert res["phases"]["import"] == []
    assert res["phases"]["device commands"] == [], res  # validate --no-plots, inspect, engine build/add, --help
    assert set(res["phases"]["validate with plots"]) <= {"matplotlib"}  # plots are the one optional extra
    assert res["codes"]["help"][0] == 0 and res["codes"]["validate"][0] == 0 and res["codes"]["inspect"][0] == 0
    assert res["codes"]["engine build"][0] == 2 and res["codes"]["engine add"][0] == 2  # no TensorRT / no plan


FULL_LINE = re.compile(r"^error: this needs (torch|transformers)\b.*pip install 'sparsekd-deploy\[full\]'$")


def test_lean_install_simulated(ort_bundle, tiny_dirs, tmp_path):
    """torch & co. made unimportable: the device commands work (plots skipped with a note), the build-host ones
    end with one line naming [full] and exit 2."""
    res = _probe(_copy(ort_bundle, tmp_path), tiny_dirs["llama"], block=HEAVY + ("tokenizers", "onnx"))
    codes = res["codes"]
    assert codes["validate"][0] == 0 and codes["inspect"][0] == 0
    assert codes["validate with plots"][0] == 0
    for key in ("distill", "validate --teacher"):
        assert codes[key][0] == 2 and FULL_LINE.match(codes[key][1]), codes[key]


def test_missing_dependency_names_the_extra():
    from sparsekd_deploy.errors import MissingDependencyError

    def err(name):
        return MissingDependencyError.from_import_error(ModuleNotFoundError(f"No module named '{name}'", name=name))

    assert err("torch.nn").extra == "full" and "pip install 'sparsekd-deploy[full]'" in str(err("transformers"))
    assert err("onnxruntime").extra == "device" and "[gpu]" in str(err("onnxruntime"))
    assert err("cuda.bindings").extra == "tensorrt" and err("cuda.bindings").package == "cuda-python"
    assert err("sentencepiece") is None  # not ours to name: the traceback stays


# --- choosing the CUDA binding (no GPU needed: the bindings are faked) ---------------------------------------------


class FakeCudart(types.ModuleType):
    """Enough of cuda-python's runtime API, on host memory (ctypes buffers stand in for device memory)."""

    class cudaError_t:  # noqa: N801  (the binding's spelling)
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, devices=1):
        super().__init__("cuda.bindings.runtime")
        self.devices, self.live, self.freed = devices, {}, []

    def cudaStreamCreate(self):  # noqa: N802
        return 0, 7

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaMalloc(self, n):  # noqa: N802
        buf = ctypes.create_string_buffer(n)
        self.live[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):  # noqa: N802
        self.freed.append(ptr)
        self.live.pop(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaGetDeviceCount(self):  # noqa: N802
        return (0, self.devices) if self.devices else (self.cudaError_t.cudaErrorNoDevice, 0)

    def cudaGetDeviceProperties(self, i):  # noqa: N802
        return 0, types.SimpleNamespace(name=b"Orin (nvgpu)\0\0", major=8, minor=7)

    def cudaRuntimeGetVersion(self):  # noqa: N802
        return 0, 12060

    def cudaGetErrorString(self, err):  # noqa: N802
        return 0, b"fake error"


def _install_cudart(monkeypatch, cudart, legacy=False):
    cuda = types.ModuleType("cuda")
    if legacy:  # cuda-python before 12.6: `from cuda import cudart`
        cuda.cudart = cudart
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    else:
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime = cudart
        cuda.bindings = bindings
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda", cuda)


@pytest.fixture
def fresh_choice(monkeypatch):
    monkeypatch.delenv(cuda_memory.ENV, raising=False)
    monkeypatch.setattr(cuda_memory, "_cached", {})


@pytest.mark.parametrize("legacy", [False, True])
def test_cuda_python_is_chosen_when_installed(monkeypatch, fresh_choice, legacy):
    cudart = FakeCudart()
    _install_cudart(monkeypatch, cudart, legacy)
    name, module = cuda_memory.choose()
    assert (name, module) == ("cuda-python", cudart)
    assert isinstance(cuda_memory.backend(), cuda_memory.CudaPythonBackend)


def test_torch_is_the_fallback(monkeypatch, fresh_choice):
    import torch

    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime"):  # no cuda-python
        monkeypatch.setitem(sys.modules, name, None)
    assert cuda_memory.choose() == ("torch", torch)


def test_forced_binding_and_none_installed(monkeypatch, fresh_choice):
    _install_cudart(monkeypatch, FakeCudart())
    monkeypatch.setenv(cuda_memory.ENV, "torch")
    assert cuda_memory.choose()[0] == "torch"
    monkeypatch.setenv(cuda_memory.ENV, "cupy")
    with pytest.raises(cuda_memory.CudaBindingError, match="choose from cuda-python, torch"):
        cuda_memory.choose()
    monkeypatch.delenv(cuda_memory.ENV)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(cuda_memory.CudaBindingError, match=r"sparsekd-deploy\[tensorrt\]"):
        cuda_memory.choose()
    assert cuda_memory.device_facts() == {"compute_capability": None, "device_name": None, "cuda_version": None}


def test_this_machine_reads_the_gpu_through_cuda_python(monkeypatch, fresh_choice):
    from sparsekd_deploy.exporters.trt_compat import this_machine

    _install_cudart(monkeypatch, FakeCudart())
    info = this_machine()
    assert (info["compute_capability"], info["device_name"], info["cuda_version"]) == ("8.7", "Orin (nvgpu)", "12.6")
    _install_cudart(monkeypatch, FakeCudart(devices=0))
    assert this_machine()["compute_capability"] is None


def test_cuda_python_buffers_round_trip(monkeypatch, fresh_choice):
    """The cuda-python backend's copies, shapes, null pointer for empty buffers and frees (on the fake binding)."""
    from sparsekd_deploy.targets.tensorrt import tensor_address

    cudart = FakeCudart()
    _install_cudart(monkeypatch, cudart)
    mem = cuda_memory.backend()
    assert mem.stream_handle() == 7
    host = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    dev = mem.from_host(host[:, ::-1])  # a non-contiguous view is copied contiguously
    assert dev.shape == (2, 3, 4) and dev.numel() == 24 and dev.contiguous() is dev
    np.testing.assert_array_equal(mem.to_host(dev), host[:, ::-1])
    empty, placeholder = mem.empty((1, 4, 0, 8), np.float16), mem.empty((256,), np.uint8)
    assert empty.data_ptr() == 0 and tensor_address(empty, placeholder) == placeholder.data_ptr() != 0
    assert mem.to_host(empty).shape == (1, 4, 0, 8)
    ptr = dev.data_ptr()
    del dev
    assert ptr in cudart.freed


@pytest.mark.gpu
@pytest.mark.parametrize("binding", ["cuda-python", "torch"])
def test_backends_on_a_gpu(monkeypatch, fresh_choice, binding):
    """On a real GPU: each installed binding copies to the device and back unchanged."""
    try:
        name, _ = cuda_memory.choose((binding,))
    except cuda_memory.CudaBindingError:
        pytest.skip(f"{binding} is not installed")
    if not cuda_memory.device_facts()["compute_capability"]:
        pytest.skip("no CUDA GPU")
    monkeypatch.setenv(cuda_memory.ENV, binding)
    mem = cuda_memory.backend()
    host = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float16)
    np.testing.assert_array_equal(mem.to_host(mem.from_host(host)), host)
    assert mem.empty((2, 0), np.float32).data_ptr() == 0 and isinstance(mem.stream_handle(), int)


# --- the real thing: a fresh venv with `pip install '<repo>[device]'` ----------------------------------------------

NETWORK = re.compile(r"Failed to establish a new connection|Temporary failure in name resolution|Network is unreachable|"
                     r"ProxyError|"
                     r"Could not fetch URL|Connection refused|Read timed out|Max retries exceeded", re.I)


@pytest.mark.slow
def test_device_extra_in_a_fresh_venv(ort_bundle, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    src = tmp_path / "src"  # the checkout's package files (an in-tree build would leave build/ in the checkout)
    shutil.copytree(REPO / "sparsekd_deploy", src / "sparsekd_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{src}[device]"],
                         capture_output=True, text=True, timeout=900)
    if pip.returncode != 0:
        if NETWORK.search(pip.stdout + pip.stderr):
            pytest.skip(f"pip cannot reach PyPI: {NETWORK.search(pip.stdout + pip.stderr).group(0)}")
        pytest.fail(f"pip install '.[device]' failed:\n{pip.stderr[-3000:]}")
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "sparsekd-deploy")
    for heavy in ("torch", "transformers", "matplotlib", "optimum", "onnx"):
        r = subprocess.run([py, "-c", f"import {heavy}"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, f"{heavy} is installed by [device]"

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    bundle = _copy(ort_bundle, tmp_path)

    def run(*args):
        return subprocess.run([cli, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    assert run("--help").returncode == 0
    r = run("validate", str(bundle), "--json", *LOOSE)
    assert r.returncode == 0, r.stderr[-3000:]
    verdict = json.loads(r.stdout)
    assert verdict["passed"] is True and verdict["runtime"]["runtime"] == "onnxruntime" and verdict["recorded"]
    assert verdict["plots"] == [] and "matplotlib" in verdict["plots_skipped_because"]
    assert "Traceback" not in r.stderr
    r = run("inspect", str(bundle))
    assert r.returncode == 0 and "PASS" in r.stdout, r.stderr[-2000:]

    r = run("distill", "--teacher", str(bundle), "--out", str(tmp_path / "run"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert FULL_LINE.match(lines[0]), lines

    # The device path end to end: `ship --validate` to a loopback sshd whose sparsekd-deploy is this lean venv's.
    from sshd_server import SSHD, start_server

    if SSHD is None:
        pytest.skip("the lean venv passed its checks above; shipping to it needs OpenSSH's sshd (Debian package "
                    "openssh-server, installed by .ci/run)")
    srv = start_server(tmp_path / "sshd")
    try:
        dest = tmp_path / "device"
        r = subprocess.run([str(Path(sys.executable).with_name("sparsekd-deploy")), "ship", str(ort_bundle), *srv.host_args(),
                            "--path", str(dest), "--remote-bin", cli, "--validate", "--json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        device = json.loads(r.stdout)["devices"][0]
        assert device["verdict"] == "activated" and device["steps"][-1]["summary"].startswith("PASS"), device
    finally:
        srv.stop()
