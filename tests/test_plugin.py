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


def _imported_modules(path) -> set:
    """Every module a file names in an import statement, at any depth (deferred imports included)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_radix_tree_and_backend_meet_only_in_the_shared_layer():
    """radix_ext/ never imports attention_backend/ nor the other way, not even inside a function:
    what they hand each other is in tree_port.py, which imports only algo/, and the tree finds the backend through
    runtime.py."""
    from pathlib import Path

    import zoomr_sglang

    package = Path(zoomr_sglang.__file__).parent
    radix_files = sorted((package / "radix_ext").glob("*.py"))
    assert len(radix_files) >= 3
    for path in radix_files:
        backward = [m for m in _imported_modules(path) if m.startswith("zoomr_sglang.attention_backend")]
        assert not backward, f"{path.name} imports {backward}"
    own = [m for m in _imported_modules(package / "tree_port.py") if m.startswith("zoomr_sglang")]
    assert own and all(m.startswith("zoomr_sglang.algo") for m in own)
    backend_files = sorted((package / "attention_backend").glob("*.py"))
    assert len(backend_files) >= 10
    for path in backend_files:
        forward = [m for m in _imported_modules(path) if m.startswith("zoomr_sglang.radix_ext")]
        assert not forward, f"{path.name} imports {forward}"


REGISTER_PROBE = r"""
import json, sys
import zoomr_sglang.plugin
on_import = sorted(m for m in sys.modules if m.split(".")[0] in ("zoomr_sglang", "torch", "numpy", "sglang"))
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()  # SGLang's own loading: register() through the entry point, then every hook applied
print(json.dumps({"on_import": on_import, "patched": len(HookRegistry._patched),
                  "after_register": sorted(m for m in sys.modules if m.startswith("zoomr_sglang"))}))
"""


def test_register_imports_nothing_heavy():
    """SGLang loads the plug-in in every process it starts; the entry point imports neither torch
    nor numpy nor the backend, and registering and applying every hook adds nothing of the package:
    the hooks import their modules at their first call."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", REGISTER_PROBE], capture_output=True, text=True, check=True).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["on_import"] == ["zoomr_sglang", "zoomr_sglang.plugin", "zoomr_sglang.runtime"]
    assert probe["patched"] >= 19
    assert probe["after_register"] == ["zoomr_sglang", "zoomr_sglang.plugin", "zoomr_sglang.runtime"]


def test_a_deferred_hook_imports_its_module_at_the_first_call(tmp_path, monkeypatch):
    import sys

    from zoomr_sglang.plugin import _deferred

    (tmp_path / "zoomr_probe_hooks.py").write_text("def around(original, x, *, y):\n    return original(x, y=y) + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = _deferred("zoomr_probe_hooks", "around")
    assert "zoomr_probe_hooks" not in sys.modules
    assert hook(lambda x, y: x * y, 3, y=4) == 13  # arguments and result pass through
    assert "zoomr_probe_hooks" in sys.modules
    monkeypatch.delitem(sys.modules, "zoomr_probe_hooks")


def test_every_hook_applied_or_the_backend_refuses(monkeypatch):
    """SGLang's HookRegistry only logs a target it cannot patch; the backend must stop instead,
    naming the target and the SGLang version it was built for."""
    import pytest
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from zoomr_sglang.plugin import _hook_table, check_hooks_applied

    load_plugins()
    targets = [target for target, _, _ in _hook_table()]
    assert len(targets) == len(set(targets)) == 19 and set(targets) <= HookRegistry._patched
    check_hooks_applied()  # every target patched: no error
    gone = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows"
    monkeypatch.setattr(HookRegistry, "_patched", HookRegistry._patched - {gone})
    with pytest.raises(RuntimeError, match=f"hook on {gone}.*built for SGLang 0.5.23"):
        check_hooks_applied()


def test_graph_modes_zoomr_cannot_replay_are_named():
    from zoomr_sglang.server_checks import graph_mode_problem

    assert graph_mode_problem(True, "full", "disabled", prefill_explicit=True) == ""
    assert graph_mode_problem(True, "disabled", "full", prefill_explicit=False) == ""  # default: turned off
    assert graph_mode_problem(False, "full", "breakable", prefill_explicit=True) == ""  # another prefill backend
    assert "--cuda-graph-backend-decode breakable" in graph_mode_problem(False, "breakable", "disabled",
                                                                         prefill_explicit=False)
    assert "--cuda-graph-backend-prefill full" in graph_mode_problem(True, "full", "full", prefill_explicit=True)


def test_index_store_is_counted_in_sglangs_per_token_cost(monkeypatch):
    """With zoomr decoding and the automatic index size, SGLang's per-token KV cost (which it
    divides the memory it may use by) includes zoomr's index share, so pool + index stay within
    --mem-fraction-static; otherwise SGLang's cost is returned unchanged."""
    from types import SimpleNamespace

    from sglang.srt.runtime_context import get_parallel, reset_context, restore_context, snapshot_context

    from zoomr_sglang.attention_backend.factory import TOKENS_PER_INDEX_ENTRY
    from zoomr_sglang.server_checks import after_compute_cell_size

    monkeypatch.delenv("ZOOMR_CONFIG", raising=False)

    def kvc(**backends):
        server_args = SimpleNamespace(attention_backend="zoomr", prefill_attention_backend=None,
                                      decode_attention_backend=None)
        server_args.__dict__.update(backends)
        return SimpleNamespace(server_args=server_args,
                               model_config=SimpleNamespace(get_num_kv_heads=lambda tp: 8 // tp, head_dim=128))

    bf16_cell = 32 * 8 * (128 + 128) * 2  # Llama-3.1-8B: 32 layers, 8 KV heads
    entry = 32 * (8 * 128 + 1) * 4
    # A clean parallel context: a test earlier in the same process may have resolved a TP=2 server's
    # arguments, which SGLang publishes process-wide (tp, MoE and attention widths alike).
    saved = snapshot_context()
    reset_context()
    try:
        with get_parallel().override(attn_tp_size=1):
            assert after_compute_cell_size(bf16_cell, None, kvc(), 32) == bf16_cell + -(-entry // TOKENS_PER_INDEX_ENTRY)
            assert after_compute_cell_size(bf16_cell, None, kvc(decode_attention_backend="flashinfer"), 32) == bf16_cell
            monkeypatch.setenv("ZOOMR_CONFIG", '{"index_entries": 4096}')  # a fixed size the user chose: not per token
            assert after_compute_cell_size(bf16_cell, None, kvc(), 32) == bf16_cell
    finally:
        restore_context(saved)
