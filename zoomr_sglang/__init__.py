"""ZoomR for SGLang: thought-level sparse KV retrieval for long reasoning (`--attention-backend zoomr`)."""
