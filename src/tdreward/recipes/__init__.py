"""Recipes: commands that chain several capabilities (quickstart; LoRA-fine-tune an Ollama model and deploy it)."""
