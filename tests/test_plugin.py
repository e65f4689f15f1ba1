"""The installed entry point registers the backend and the CLI choice; nothing else does."""

from importlib.metadata import entry_points


def test_entry_point_is_installed():
    (point,) = [p for p in entry_points(group="sglang.srt.plugins") if p.name == "zoomr"]
    assert point.value == "zoomr_sglang.plugin:register"


def test_load_plugins_registers_backend_and_choice():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins

    load_plugins()
    assert "zoomr" in ATTENTION_BACKENDS
    assert ATTENTION_BACKEND_CHOICES.count("zoomr") == 1


IMPORT_PROBE = r"""
import importlib, json, pkgutil, sys
import zoomr_sglang.algo as algo
names = [m.name for m in pkgutil.iter_modules(algo.__path__, "zoomr_sglang.algo.")]
for name in names:
    importlib.import_module(name)
after_algo = sorted(m for m in sys.modules if m.startswith(("sglang", "zoomr_sglang")) and not m.startswith("zoomr_sglang.algo"))
import zoomr_sglang.config
after_config = sorted(m for m in sys.modules if m.startswith(("sglang", "zoomr_sglang"))
                      and not m.startswith(("zoomr_sglang.algo", "zoomr_sglang.config")))
print(json.dumps({"algo_modules": names, "after_algo": after_algo, "after_config": after_config}))
"""


def test_imports_run_one_way():
    """algo/ imports nothing of the package (nor SGLang) and config imports only algo/, so the
    method stays testable without the engine and no import circle can hide behind a deferred import."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert "zoomr_sglang.algo.policies" in probe["algo_modules"] and len(probe["algo_modules"]) >= 7
    # Only the package's own __init__ may be loaded besides algo/ (Python imports parents first).
    assert probe["after_algo"] == ["zoomr_sglang"]
    assert probe["after_config"] == ["zoomr_sglang"]
