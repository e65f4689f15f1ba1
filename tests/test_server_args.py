"""Every server command line ``benchmarks/serving.py`` can start (both presets, both parts, both
backends) goes through SGLang 0.5.23's own parser, as ``launch_server`` would parse it on the device:
an unknown or ambiguous flag (``--cuda-graph-max-bs`` once made argparse exit with status 2 and
both GPU servers die at start) fails here, on the CPU. The CPU rehearsal's arguments are also
resolved in full against a shaped model on disk; the GPU preset's resolution needs CUDA."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from serving_presets import (  # noqa: E402
    BACKENDS, PARTS, PRESETS, cuda_graph_max_bs, server_command_lines, zoomr_env)

MODEL = "/models/llama-3.1-8b-shape"


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()  # as launch_server does before parsing: registers the zoomr backend choice
    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    return parser


def parse(parser: argparse.ArgumentParser, command):
    from sglang.srt.server_args import ServerArgs

    assert command[1:3] == ["-m", "sglang.launch_server"]
    try:
        namespace = parser.parse_args(command[3:])
    except SystemExit as error:
        pytest.fail(f"SGLang's parser refused {command[3:]} (exit {error.code})")
    return ServerArgs.from_cli_args(namespace)


@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_every_command_line_parses_with_exact_flags(parser, preset_name):
    preset = PRESETS[preset_name]
    lines = server_command_lines(preset, MODEL, port=31000)
    assert set(lines) == {(part, backend) for part in PARTS for backend in BACKENDS}
    for (part, backend), command in lines.items():
        # No flag may lean on argparse's prefix matching: a new SGLang flag would make it ambiguous.
        flags = [token.split("=", 1)[0] for token in command[3:] if token.startswith("--")]
        assert [f for f in flags if f not in parser._option_string_actions] == []
        args = parse(parser, command)
        assert args.model_path == MODEL and args.port == 31000 and args.load_format == "dummy"
        assert args.prefill_attention_backend == preset.prefill_backend
        assert args.decode_attention_backend == (preset.dense_backend if backend == "dense" else "zoomr")
        assert args.device == preset.device and args.enable_metrics and args.skip_server_warmup
        assert args.max_running_requests == preset.max_running[part] and args.max_total_tokens == preset.pool_tokens
        if preset.device == "cuda":
            assert args.cuda_graph_max_bs_decode == cuda_graph_max_bs(preset, part) == max(
                [b for _, b in preset.cells] if part == "timing" else [preset.probe_requests])
            assert args.disable_prefill_cuda_graph and args.dtype == "bfloat16"
        else:
            assert args.dtype == "float32"


@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_dense_and_zoomr_differ_only_in_the_decode_backend(preset_name):
    """Same memory (``--mem-fraction-static``, pool), graphs and scheduling for both servers."""
    lines = server_command_lines(PRESETS[preset_name], MODEL)
    for part in PARTS:
        dense, zoomr = lines[(part, "dense")], lines[(part, "zoomr")]
        differ = [(a, b) for a, b in zip(dense, zoomr) if a != b]
        assert len(dense) == len(zoomr) and differ == [(PRESETS[preset_name].dense_backend, "zoomr")]


@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_self_checks_run_in_the_probe_only(preset_name):
    """Timing never samples eager float64 steps; the probe's interval exceeds its full-policy run,
    so none of the steps compared with dense token for token ran eagerly."""
    preset = PRESETS[preset_name]
    timing = zoomr_env(preset, "timing", {"ZOOMR_WINDOW": "128", "ZOOMR_CONFIG": '{"vote": "count"}'})
    assert timing["ZOOMR_WINDOW"] == "128"  # the override's ZOOMR_CONFIG keys join the preset's
    assert json.loads(timing["ZOOMR_CONFIG"]) == {"refresh_interval": 30, "vote": "count"}
    probe = json.loads(zoomr_env(preset, "probe", {})["ZOOMR_CONFIG"])
    assert probe["self_check_interval"] > preset.probe_full_tokens + 2
    with pytest.raises(ValueError, match="timing never"):
        zoomr_env(preset, "timing", {"ZOOMR_CONFIG": '{"self_check_interval": 997}'})


def test_rehearsal_arguments_resolve_in_full(parser, tmp_path):
    """SGLang's whole resolution pipeline (device, model config, backends, memory) on the CPU."""
    from testbed.shaped_model import shape_overrides, write_shaped_model

    preset = PRESETS["rehearsal"]
    model = write_shaped_model(tmp_path / "model", **shape_overrides(*preset.model_shape))
    for (part, backend), command in server_command_lines(preset, str(model)).items():
        args = parse(parser, command)
        args.resolve_once()
        assert args.decode_attention_backend == (preset.dense_backend if backend == "dense" else "zoomr"), (part, backend)
