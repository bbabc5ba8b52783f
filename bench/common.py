"""Shared pieces of the benchmark workers: the model, the configs, timers and memory probes."""

from __future__ import annotations

import gc
import os
import re
import time

import torch

THREADS = 2
TRAIN_BATCH = (2, 128)  # rows x tokens
INFER_BATCH = (16, 64)  # >= 16 rows so that a mixed batch can hold 16 adapters
RANK, ALPHA = 16, 32


def setup_torch() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


def library(name: str):
    """(LoraConfig, get_peft_model, PeftModel) of ``peft`` or ``peftcore``."""
    if name == "peft":
        from peft import LoraConfig, PeftModel, get_peft_model
    else:
        from peftcore import LoraConfig, PeftModel, get_peft_model
    return LoraConfig, get_peft_model, PeftModel


def lora_config(lib: str, **overrides):
    LoraConfig, _, _ = library(lib)
    kwargs = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def model_dir() -> str:
    from peftcore.cli.assets import smollm2_dir

    return str(smollm2_dir())


def load_model():
    """SmolLM2-135M in fp32 (the converted safetensors copy; ~0.1-0.3 s after the first call)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    model.config.use_cache = False
    # the loader maps the safetensors file: pages arrive on first use and may be evicted
    # again. Private copies keep page faults out of the timings and the RSS baseline.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model


def batch(rows: int, tokens: int, vocab: int = 49152, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, tokens), generator=gen)


def randomize_lora_B(model) -> None:
    """Fresh adapters have B = 0; give them values so that no path can skip work on zeros."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): the second is less sensitive to other jobs."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def repeat(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [timed(fn) for _ in range(reps)]


# -- memory: resident set size from /proc (psutil-free) ----------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        found = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field}; memory measurements need Linux")
    return int(found.group(1))


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Set the high-water mark to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def malloc_env() -> dict[str, str]:
    """glibc settings for memory runs: big blocks go to mmap and are returned when freed.

    Without them freed activations stay in malloc's arenas and the RSS peak of a step
    depends on what earlier steps left behind; the same settings apply to every library.
    """
    return {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


def env_for_worker() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"})
    return env
