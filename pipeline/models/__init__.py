"""Loading HF models and tokenizers, LoRA adapters, the tiny models of the built-in tasks."""
