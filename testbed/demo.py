"""``python -m testbed.demo``: serve a tiny local model through SGLang with ``--attention-backend
zoomr`` and show, per request, how much KV each decode step attended compared with dense attention.

The model is built here (random weights, its own tokenizer), so the text it writes is noise; what the
demo shows is the mechanism: thoughts cut at blank lines, votes, zoom-ins and the bounded working set.
On a CPU machine run it through ``./dev demo``, which sets up SGLang's CPU engine.
"""

from __future__ import annotations

import argparse
import os
import time

# A budget that bites on the tiny model's short thoughts; any ZOOMR_* already set wins.
DEMO_SETTINGS = {"ZOOMR_SINK": "4", "ZOOMR_WINDOW": "64", "ZOOMR_MAX_THOUGHT_TOKENS": "64"}


def _prompts(n: int) -> list:
    return [[0] + [(13 * i + 7 * r) % 500 + 2 for i in range(8 + 9 * r)] for r in range(n)]


def _report(outputs: list, zoomr: dict, elapsed: float) -> None:
    print(f"\n{len(outputs)} requests, {sum(len(o['output_ids']) for o in outputs)} tokens generated in {elapsed:.1f} s\n")
    header = f"{'request':>8} {'tokens':>7} {'thoughts':>8} {'attended/step':>13} {'dense/step':>10} {'ratio':>6} {'last step':>15} {'bound':>6} {'agree':>6}"
    print(header)
    print("-" * len(header))
    for n, out in enumerate(outputs):
        s = zoomr["finished"][out["meta_info"]["id"]]
        attended, dense = s["attended_total"] / s["steps"], s["dense_total"] / s["steps"]
        print(f"{n:>8} {len(out['output_ids']):>7} {s['thoughts_closed']:>8} {attended:>13.1f} {dense:>10.1f} "
              f"{dense / attended:>5.2f}x {s['attended_last']:>6} of {s['dense_last']:>5} {s['bound_last']:>6} "
              f"{s['agreement_mean'] or 0:>6.2f}")
    print("\nThoughts zoomed into (each new selection, thought numbers, oldest first):")
    for n, out in enumerate(outputs):
        s = zoomr["finished"][out["meta_info"]["id"]]
        history = s["zoom_history"]
        shown = " -> ".join(str(sel) for sel in history[-8:])
        print(f"  request {n}: {s['selection_changes']} changes; last: {'... -> ' if len(history) > 8 else ''}{shown}")
    print("\nFirst 160 characters of request 0:", repr(outputs[0]["text"][:160]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=1500)
    args = parser.parse_args(argv)
    for key, value in DEMO_SETTINGS.items():
        os.environ.setdefault(key, value)

    import sglang
    import torch

    from testbed.tiny_model import tiny_model_dir

    model_path = str(tiny_model_dir())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("ZOOMR_")}
    print(f"model: {model_path} (tiny, random weights)\ndevice: {device}\nsettings: {settings}")
    engine = sglang.Engine(model_path=model_path, attention_backend="zoomr", device=device, dtype="float32",
                           max_total_tokens=16384, mem_fraction_static=0.05, skip_server_warmup=True)
    try:
        start = time.time()
        outputs = engine.generate(
            input_ids=_prompts(args.requests),
            sampling_params={"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True},
        )
        elapsed = time.time() - start
        _report(outputs, engine.get_server_info()["internal_states"][0]["zoomr"], elapsed)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
