"""The zoomr radix cache (``--radix-cache-backend zoomr``): prefix caching that keeps thoughts,
index keys and host-tier holes across requests. See docs/radix-cache.md."""
