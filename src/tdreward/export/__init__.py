"""Export: transformers models (a LoRA adapter merged) written as GGUF files for llama.cpp and Ollama."""
