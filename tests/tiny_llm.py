"""Tiny language models and a real OpenAI-compatible server for the LLM tests (filled in by the LLM backend work)."""
