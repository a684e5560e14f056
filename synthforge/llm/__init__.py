"""Language models behind generation and judging: local transformers or an OpenAI-compatible server."""
