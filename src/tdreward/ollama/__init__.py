"""Ollama: Modelfiles from chat templates, create / run / evaluate / delete through the Ollama API."""
