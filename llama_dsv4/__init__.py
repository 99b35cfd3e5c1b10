"""llama_dsv4: local inference of DeepSeek V4 GGUF files (arch `deepseek4`) on ggml."""

__version__ = "0.1.0"
