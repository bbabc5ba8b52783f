import os
import tempfile

# Set before transformers/huggingface_hub are imported anywhere: tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="peftcore-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
