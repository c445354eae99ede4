"""Models built from torchext ops: Gemma 3 over a GGUF file (gemma3.py) and the GGUF tokenizer."""
