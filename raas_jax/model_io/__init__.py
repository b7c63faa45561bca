"""Model I/O: HF safetensors and GGUF conversion into orbax checkpoints, HF export, the default model."""
