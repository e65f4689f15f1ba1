"""The SGLang attention backend: thin glue around :mod:`zoomr_sglang.algo`."""
