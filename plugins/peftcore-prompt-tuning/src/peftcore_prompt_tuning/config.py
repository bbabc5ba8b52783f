"""``PromptTuningConfig``: PEFT's fields and defaults, checked when the config is made."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from peftcore.prompt_learning import PromptLearningConfig
from peftcore.validation import ConfigError


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    prompt_tuning_init: Union[PromptTuningInit, str] = field(
        default=PromptTuningInit.RANDOM,
        metadata={
            "help": "How the virtual tokens start: RANDOM (N(0,1)), TEXT (embeddings of prompt_tuning_init_text) "
                    "or SAMPLE_VOCAB (random vocabulary rows)"
        },
    )
    prompt_tuning_init_text: Optional[str] = field(
        default=None,
        metadata={
            "help": "Text whose token embeddings (repeated or cut to num_virtual_tokens) start the prompt; "
                    "TEXT init only"
        },
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer (local folder or Hub id) for prompt_tuning_init_text; TEXT init only"},
    )
    tokenizer_kwargs: Optional[dict] = field(
        default=None, metadata={"help": "Keyword arguments for AutoTokenizer.from_pretrained; TEXT init only"}
    )

    def __post_init__(self):
        self.peft_type = "PROMPT_TUNING"
        super().__post_init__()  # types and ranges of every field (peftcore.validation)
        try:
            self.prompt_tuning_init = PromptTuningInit(str(self.prompt_tuning_init))
        except ValueError:
            valid = ", ".join(i.value for i in PromptTuningInit)
            raise ConfigError(
                f"PromptTuningConfig: prompt_tuning_init must be one of {valid}, got {self.prompt_tuning_init!r}",
                "prompt_tuning_init", self.prompt_tuning_init,
            ) from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ConfigError("When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be None "
                                  "(PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path)",
                                  "tokenizer_name_or_path", self.tokenizer_name_or_path)
            if self.prompt_tuning_init_text is None:
                raise ConfigError("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None "
                                  "(PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text)",
                                  "prompt_tuning_init_text", None)
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'. "
                              "(PromptTuningConfig: tokenizer_kwargs is only used with prompt_tuning_init='TEXT')",
                              "tokenizer_kwargs", self.tokenizer_kwargs)
