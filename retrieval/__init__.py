"""Image retrieval on learned embeddings: embedding, search, kNN labels, anomaly scores, CLI."""
