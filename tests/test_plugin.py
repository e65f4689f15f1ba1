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


def test_algorithm_never_imports_sglang():
    """algo/ is torch only, so it stays testable and reusable without the engine."""
    import subprocess
    import sys

    code = ("import sys, zoomr_sglang.algo.segmentation, zoomr_sglang.algo.index_keys, zoomr_sglang.algo.voting, "
            "zoomr_sglang.algo.working_set, zoomr_sglang.algo.reference; "
            "print(sorted(m for m in sys.modules if m.startswith('sglang')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
