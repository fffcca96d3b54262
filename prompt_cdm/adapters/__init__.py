"""Per-source adapters on the frozen backbone: soft prompts, LoRAs and deep prompts, and their folders on disk.

    soft_prompt.py  n learned token embeddings behind a placeholder (diffusers' textual-inversion format)
    lora.py         named peft LoRA adapters on the UNet (and optionally the text encoder)
    deep_prompt.py  m learned tokens in every cross-attention layer of the UNet (its attention processor)
    store.py        the adapter folder: save, strict load, config; card.py writes its model card
"""
from .deep_prompt import DeepPrompt, DeepPromptConfig
from .errors import AdapterError
from .lora import LoraAdapter, LoraAdapterConfig
from .soft_prompt import SoftPrompt, SoftPromptConfig, expand_prompt, expand_prompts
from .store import AdapterConfig, LoadedAdapter, load_adapter, read_adapter_config, save_adapter

__all__ = [
    "AdapterConfig", "AdapterError", "DeepPrompt", "DeepPromptConfig", "LoadedAdapter", "LoraAdapter", "LoraAdapterConfig", "SoftPrompt",
    "SoftPromptConfig", "expand_prompt", "expand_prompts", "load_adapter", "read_adapter_config", "save_adapter",
]
