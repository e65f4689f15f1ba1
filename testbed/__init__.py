"""What the demo, the tests and the benchmarks run on; not part of the installed plug-in.

- ``tiny_model``: a random-weight Llama with its own BPE tokenizer, built offline (engine tests).
- ``program_trace`` + ``reasoner_long/`` and ``reasoner/``: a seeded reasoning task in two
  proportions (``long``: real-trace proportions, the accuracy benchmark's; ``short``: the tests' and
  the demo's) and the small model trained on each (``train_reasoner.py``), so that accuracy can be
  measured without downloading weights.
- ``policy_runs``, ``forcing``: the engine driver of the accuracy and fidelity benchmarks.
- ``smollm2``: the optional real pretrained model (SmolLM2-135M-Instruct from a local GGUF).
- ``demo``: ``./dev demo``.
"""
