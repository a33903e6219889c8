"""--teacher-precision: which dtype the teacher is held in while the student trains."""

import torch

from sparsekd_deploy.core.teacher_precision import name, teacher_dtype


def test_auto_follows_the_gpu_autocast_type_and_stays_fp32_on_a_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read: no GPU needed
    assert teacher_dtype("auto", cuda, "bf16") == torch.bfloat16
    assert teacher_dtype("auto", cuda, "fp16") == torch.float16
    assert teacher_dtype("auto", cuda, "no") == torch.float32  # an fp32 run (--precision fp32)
    assert teacher_dtype("auto", cpu, "no") == torch.float32
    assert teacher_dtype("bf16", cpu, "no") == torch.bfloat16  # asked for: held so even on a CPU
    assert teacher_dtype("fp32", cuda, "bf16") == torch.float32
    assert [name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]
