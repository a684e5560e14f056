"""Text-specific curation: sentence embeddings, semantic dedup, decontamination, LLM judge and review."""
