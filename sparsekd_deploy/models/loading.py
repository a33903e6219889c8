"""Load teachers and students: local Hugging Face model dirs (safetensors only), the demo teacher, or the
local Hub cache. Nothing is downloaded at run time and nothing is unpickled.

Every way a model dir can be unusable (no or corrupt weights, a missing shard or tensor, an unreadable
config.json, a model that is not a causal LM, no tokenizer) ends in one :class:`ModelLoadError` or
:class:`TeacherNotFoundError` line that names the dir and the fix, never in a traceback from transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ModelLoadError, TeacherNotFoundError, first_line

DEMO = "demo"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Files any Hugging Face tokenizer is saved as; a dir with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
EXAMPLES = "llama, qwen2, gpt2, opt"
# Bidirectional encoders that transformers maps to a *ForCausalLM/LMHeadModel class, which only behaves as one
# with `is_decoder: true` in config.json (each class warns "add `is_decoder=True`" otherwise).
ENCODERS = frozenset({
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
    "qdqbert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta",
    "xlm-roberta-xl", "xmod",
})


def demo_teacher_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "demo" / "teacher"


def resolve_teacher(spec: str | None) -> Path:
    """Turn ``--teacher`` into a local model dir, or explain precisely why that is not possible."""
    if spec in (None, "", DEMO):
        path = demo_teacher_dir()
        if not (path / WEIGHTS).is_file():
            raise TeacherNotFoundError(
                f"the demo teacher is missing from {path}; reinstall the package or run scripts/make_demo_teacher.py"
            )
        return path
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherNotFoundError(f"teacher {spec!r} is a file; pass the model directory that holds config.json")
        problem = _dir_problem(path)
        if problem:
            raise TeacherNotFoundError(f"teacher dir {spec!r} {problem}")
        return path
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        cached = _from_hub_cache(spec)
        if cached is not None:
            return cached
        raise TeacherNotFoundError(
            f"teacher {spec!r} looks like a Hub id, but this tool never downloads at run time and it is not in the "
            f"local Hub cache; on a connected machine run `huggingface-cli download {spec} --local-dir ./{spec.split('/')[-1]}` "
            "and pass --teacher with that directory"
        )
    raise TeacherNotFoundError(f"teacher path {spec!r} does not exist")


def _dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable model dir (config.json + safetensors weights), or None."""
    if (path / "adapter_config.json").is_file():
        return ("is a PEFT/LoRA adapter (adapter_config.json), not a full model; merge it into its base model "
                "(`model.merge_and_unload().save_pretrained(dir, safe_serialization=True)`) and pass that dir")
    if not (path / "config.json").is_file():
        return "has no config.json; is it a Hugging Face model dir?"
    if (path / WEIGHTS).is_file() or (path / INDEX).is_file():
        return None
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return (f"has {', '.join(others)} but no {WEIGHTS} or {INDEX}, the names transformers loads; "
                "re-save it with `model.save_pretrained(dir, safe_serialization=True)`")
    return ("has no *.safetensors weights; pickled .bin/.pt files are refused for safety "
            "(convert once with `model.save_pretrained(dir, safe_serialization=True)` where you trust the file)")


def _from_hub_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    return path if (path / "config.json").is_file() else None


def _first_line(e: BaseException | str) -> str:
    return first_line(e, 200)  # cut short: transformers can put 150 model names on one line


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def causal_config(path: Path, role: str = "model"):
    """The model's transformers config, checked to be a decoder-only causal LM; one ModelLoadError line if not."""
    from transformers import AutoConfig, __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    where = f"{role} dir {path}"
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{where} has no config.json; is it a Hugging Face model dir?") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ModelLoadError(f"{where}: config.json is not valid JSON ({_first_line(e)}); restore it from "
                             "the model's source") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: config.json must be a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if not model_type:
        raise ModelLoadError(f"{where}: config.json has no model_type; pass a decoder-only model such as {EXAMPLES}")
    if model_type not in CONFIG_MAPPING_NAMES:
        custom = " (it ships its own modelling code, which this tool never runs)" if "auto_map" in raw else ""
        raise ModelLoadError(f"{where}: model_type {model_type!r} is not known to transformers {__version__}{custom}; "
                             f"pass a decoder-only model such as {EXAMPLES}, or upgrade transformers if it is newer")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{where}: config.json cannot be read by transformers ({_first_line(e)})") from None
    causal = (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)
              and (model_type not in ENCODERS or getattr(config, "is_decoder", False)))
    if not causal:
        raise ModelLoadError(f"{where} is not a causal language model (model_type {model_type}); "
                             f"pass a decoder-only model such as {EXAMPLES}")
    return config


def _check_shards(path: Path, where: str) -> None:
    index = path / INDEX
    if (path / WEIGHTS).is_file() or not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{where}: {INDEX} is not a valid shard index ({_first_line(e)})") from None
    missing = sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise ModelLoadError(f"{where} is missing {len(missing)} of its {len(shards)} weight shard(s) listed in "
                             f"{INDEX}: {_names(missing)}; copy the complete model dir")


def _corrupt_files(path: Path) -> list[str]:
    """The safetensors files of ``path`` whose header cannot be read (truncated, garbage)."""
    from safetensors import safe_open

    bad = []
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to open means this file is the broken one
            bad.append(f.name)
    return bad


def load_model(path: Path, dtype=None, role: str = "model"):
    """Load a causal LM from a local dir, safetensors only, with every weight from the file.

    Raises one ModelLoadError line (naming ``role`` dir ``path``) when the config is unreadable or not a causal
    LM, a weight file is missing, truncated or corrupt, or any weight is missing, unexpected or of another shape
    than the config says (transformers would otherwise initialise it at random; weights tied to another one,
    such as lm_head to the embeddings under ``tie_word_embeddings``, are not missing).
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = Path(path)
    where = f"{role} dir {path}"
    if not path.is_dir():
        raise ModelLoadError(f"{where} does not exist" if not path.exists() else f"{role} {path} is a file; pass its dir")
    problem = _dir_problem(path)
    if problem:
        raise ModelLoadError(f"{where} {problem}")
    causal_config(path, role)
    _check_shards(path, where)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, local_files_only=True, dtype=dtype or torch.float32, output_loading_info=True
        )
    except SafetensorError as e:
        bad = _corrupt_files(path) or ["a weight file"]
        raise ModelLoadError(f"{where}: {', '.join(bad)} is not a readable safetensors file ({_first_line(e)}); "
                             "it is truncated or corrupt: copy or save it again") from None
    except FileNotFoundError as e:
        raise ModelLoadError(f"{where}: a weight file is missing ({e.filename or _first_line(e)}); "
                             "copy the complete model dir") from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        first = next(ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln)
        raise ModelLoadError(f"{where}: its weights do not fit its config.json ({first})") from None
    except OSError as e:
        raise ModelLoadError(f"{where} cannot be loaded: {_first_line(e)}") from None
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing from its weights (they would be randomly initialised): {_names(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"weights the model has no place for: {_names(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"weights of another shape than config.json says: {_names(k for k, *_ in info['mismatched_keys'])}")
    if info.get("error_msgs"):
        problems.append(_first_line(info["error_msgs"][0]))
    if problems:
        raise ModelLoadError(f"{where} does not match its config.json: {'; '.join(problems)}; "
                             "re-save the complete model (`model.save_pretrained(dir, safe_serialization=True)`)")
    return model.eval()


def load_tokenizer(teacher_dir: Path, tokenizer_dir: str | Path | None = None, required: bool = True):
    """The tokenizer saved beside the teacher, or the one in ``tokenizer_dir`` (``--tokenizer``/``tokenizer:``).

    With no tokenizer files in the teacher dir: a ModelLoadError saying to pass ``--tokenizer DIR`` when
    ``required``, else None (data-free distillation works on token ids alone). An explicit ``tokenizer_dir``
    must hold a loadable tokenizer; a tokenizer that is there but cannot be loaded is an error either way.
    """
    from transformers import AutoTokenizer

    teacher_dir = Path(teacher_dir)
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir).expanduser()
        if not src.is_dir():
            raise ModelLoadError(f"tokenizer dir {str(tokenizer_dir)!r} "
                                 + ("is a file; pass the dir it was saved to" if src.exists() else "does not exist"))
        where = f"tokenizer dir {src}"
    else:
        src, where = teacher_dir, f"teacher dir {teacher_dir}"
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        if tokenizer_dir is None and not required:
            return None
        fix = ("pass the dir the teacher's tokenizer was saved to" if tokenizer_dir is not None else
               "pass --tokenizer DIR (or `tokenizer:` in the recipe) with the teacher's tokenizer, or save it next "
               "to the model with `tokenizer.save_pretrained(dir)`")
        raise ModelLoadError(f"{where} has no tokenizer files (tokenizer.json, tokenizer_config.json, …); {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers fails here with Attribute/Type/OS/ValueErrors alike
        raise ModelLoadError(f"the tokenizer in {where} cannot be loaded ({type(e).__name__}: {_first_line(e)}); "
                             "pass --tokenizer DIR with a complete copy of the teacher's tokenizer") from None
    return tokenizer


def max_positions(config) -> int | None:
    """How many positions a model has (the name differs between families)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
