"""TensorRT logic that needs no GPU: profiles, the trtexec command, plan headers, compatibility refusals."""

import pytest

from sparsekd_deploy.errors import ConfigError
from sparsekd_deploy.exporters.trt_compat import (
    EngineMismatchError,
    check_compat,
    check_plan_file,
    read_plan_header,
    sparse_tensor_cores,
)
from sparsekd_deploy.exporters.trt_profiles import Profile, Range, shell_line, trtexec_argv

INPUTS = {"input_ids": ["batch_size", "sequence_length"], "attention_mask": ["batch_size", "total"],
          "position_ids": ["batch_size", "sequence_length"], "past_key_values.0.key": ["batch_size", 4, "past", 64]}


def test_profile_from_cli_and_shapes():
    p = Profile.from_cli("1,2,8", "1,64,256", "0,64,256", max_positions=512)
    s = p.shapes(INPUTS)
    assert s["input_ids"] == ((1, 1), (2, 64), (8, 256))
    assert s["attention_mask"] == ((1, 1), (2, 128), (8, 512))
    assert s["past_key_values.0.key"] == ((1, 4, 0, 64), (2, 4, 64, 64), (8, 4, 256, 64))
    assert Range.parse("batch", "4") == Range(4, 4, 4)


def test_default_profile_follows_model_positions():
    # A KV-cache engine needs room for a past: the model's positions are split, not all given to the prompt.
    p = Profile.from_cli(None, None, None, max_positions=256)
    assert (p.seq, p.past) == (Range(1, 128, 128), Range(0, 128, 128))
    assert Profile.from_cli(None, None, None, max_positions=4096) == Profile()  # defaults fit: untouched


def test_axes_left_out_fit_around_the_ones_given():
    p = Profile.from_cli("1,1,2", None, "0,64,200", max_positions=256)
    assert p.seq == Range(1, 56, 56) and p.batch == Range(1, 1, 2)
    p = Profile.from_cli(None, "1,64,200", None, max_positions=256)
    assert p.past == Range(0, 56, 56)
    p = Profile.from_cli(None, "1,64,256", None, max_positions=256)
    assert p.past == Range(0, 0, 0)  # the user asked for every position as prompt


@pytest.mark.parametrize("args,needle", [
    (("4,1,8", None, None), "min 4 > opt 1"),
    ((None, "1,512,256", None), "opt 512 > max 256"),
    ((None, "1,a,3", None), "not MIN,OPT,MAX"),
    ((None, "1,2", None), "give MIN,OPT,MAX"),
    (("0,1,1", None, None), "min 0 is below 1"),
    ((None, "1,64,400", "0,64,400"), "exceeds the model's 512 positions"),
])
def test_bad_profiles(args, needle):
    with pytest.raises(ConfigError, match=needle):
        Profile.from_cli(*args, max_positions=512)


def test_trtexec_command_per_version():
    shapes = Profile().shapes({"input_ids": ["b", "s"]})
    common = dict(shapes=shapes, sparse=True, workspace_mib=4096, timing_cache="t.cache", layer_info="l.json")
    v10 = trtexec_argv("model.fp16.onnx", "engine.plan", trt_major=10, fp16=True, **common)
    assert "--fp16" in v10 and "--sparsity=enable" in v10 and "--stronglyTyped" not in v10
    assert "--minShapes=input_ids:1x1" in v10 and "--maxShapes=input_ids:4x512" in v10
    v11 = trtexec_argv("model.fp16.onnx", "engine.plan", trt_major=11, fp16=True, **common)
    assert "--stronglyTyped" in v11 and "--fp16" not in v11
    assert shell_line(["trtexec", "--onnx=my model.onnx"]) == "trtexec '--onnx=my model.onnx'"


def _plan(major, minor, patch):
    return bytes(8) + (239).to_bytes(4, "little") + bytes(12) + bytes([major, minor, patch]) + bytes(100)


def test_plan_header(tmp_path):
    h = read_plan_header(_plan(10, 16, 1))
    assert h.trt_version == (10, 16, 1) and h.version_str == "10.16.1" and h.serialization_tag == 239
    assert read_plan_header(bytes(64)).trt_version is None
    with pytest.raises(EngineMismatchError, match="too short"):
        read_plan_header(b"abc")
    p = tmp_path / "engine.plan"
    p.write_bytes(_plan(10, 3, 0))
    with pytest.raises(EngineMismatchError, match="header says TensorRT 10.3.0, the manifest says 10.16.1"):
        check_plan_file(p, {"tensorrt_version": "10.16.1"})
    assert check_plan_file(p, {"tensorrt_version": "10.3.0.26"}).trt_version == (10, 3, 0)


def test_compat_refusals_name_both_sides():
    engine = {"tensorrt_version": "10.16.1", "compute_capability": "8.7", "device_name": "Orin"}
    check_compat(engine, {"tensorrt_version": "10.16.1", "compute_capability": "8.7"})
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10.16.1 built it, this machine has TensorRT 10.3.0"):
        check_compat(engine, {"tensorrt_version": "10.3.0", "compute_capability": "8.7"})
    with pytest.raises(EngineMismatchError, match=r"compute capability 8.7 \(Orin\), this GPU is 9.0 \(H100\)"):
        check_compat(engine, {"tensorrt_version": "10.16.1", "compute_capability": "9.0", "device_name": "H100"})
    check_compat({**engine, "hardware_compatibility": "ampere+"}, {"tensorrt_version": "10.16.1", "compute_capability": "9.0"})
    check_compat({**engine, "version_compatible": True}, {"tensorrt_version": "10.17.0", "compute_capability": "8.7"})
    with pytest.raises(EngineMismatchError):
        check_compat({**engine, "version_compatible": True}, {"tensorrt_version": "11.0.0", "compute_capability": "8.7"})


def test_sparse_tensor_cores_need_ampere():
    assert sparse_tensor_cores("8.0") and sparse_tensor_cores("9.0") and sparse_tensor_cores("8.7")
    assert not sparse_tensor_cores("7.5") and not sparse_tensor_cores(None)


def test_empty_tensors_get_a_live_address():
    # TensorRT refuses a null address even for the zero-length past of the first decode step.
    import torch

    from sparsekd_deploy.targets.tensorrt import tensor_address

    placeholder = torch.empty(256, dtype=torch.uint8)
    empty_past = torch.zeros((1, 4, 0, 64))
    assert empty_past.data_ptr() == 0  # what torch gives: the reason for the helper
    assert tensor_address(empty_past, placeholder) == placeholder.data_ptr() != 0
    full = torch.zeros((1, 4, 3, 64))
    assert tensor_address(full, placeholder) == full.data_ptr()
