"""scripts/check_trt_api.py: the name collection and the string-table reading, on a hand-made source and wheel
(no network: the real wheels are fetched only when the script runs)."""

import importlib.util
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_trt_api.py"
spec = importlib.util.spec_from_file_location("check_trt_api", SCRIPT)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

SOURCE = '''
def build(trt, logger):
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    config.set_timing_cache(cache, ignore_mismatch=False)
    print(trt.__version__, other.unrelated_call())
'''


def test_used_names_follow_trt_objects_only(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text(SOURCE)
    names = check.used_names([src])
    assert {"Builder", "BuilderFlag", "SPARSE_WEIGHTS", "create_builder_config", "set_flag", "set_timing_cache",
            "ignore_mismatch"} <= set(names)
    assert "unrelated_call" not in names and "__version__" not in names


def test_bindings_strings_reads_tail_merged_names(tmp_path):
    # The linker stores "num_errors" only as the tail of "get_num_errors", "Builder" inside "IBuilder".
    blob = b"\x00IBuilder\x00get_num_errors\x00SPARSE_WEIGHTS\x00A doc string mentioning FP16\x00"
    wheel = tmp_path / "tensorrt_cu12_bindings-10.0.0-cp311-none-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tensorrt_bindings/tensorrt.so", blob)
        zf.writestr("tensorrt_bindings/__init__.py", "float16 = 1\n")
    have = check.bindings_strings("10.0.0", tmp_path)
    assert {"Builder", "num_errors", "SPARSE_WEIGHTS", "float16"} <= have
    assert "FP16" not in have  # a word inside prose is not a name
