"""The embedder service: embeds completed runs for similarity search, on the worker's runtime."""
