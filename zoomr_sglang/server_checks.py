"""What the plug-in checks when a server starts, before any model loads: the server arguments and
the ``ZOOMR_*`` settings (SGLang's resolution hook), and the KV pool's per-token cost with the
index store (SGLang's pool configurator). Bad input stops the server with a message that names the
value and what is allowed (``docs/sglang-integration.md``, "Start-up checks")."""

from __future__ import annotations

from zoomr_sglang.plugin import BACKEND_NAME


def resolve_server_args(server_args, previous) -> None:
    """Validate what can be validated before any model loads, so bad input stops the server at start."""
    previous(server_args)
    from sglang.srt.arg_groups.overrides import attention_backends_of, declare_resolution, resolved_view, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    view = resolved_view(server_args)
    prefill, decode = attention_backends_of(view)
    if BACKEND_NAME not in (prefill, decode):
        return
    if decode != BACKEND_NAME:
        raise ValueError(
            f"--prefill-attention-backend zoomr with --decode-attention-backend {decode}: zoomr chooses what each "
            f"decode step reads and moves cold KV off the device, so it must be the decode backend; use "
            f"--decode-attention-backend zoomr (with any prefill backend)"
        )
    from zoomr_sglang.config import load_config

    load_config()  # raises ValueError naming the bad ZOOMR_* variable
    if view.speculative_algorithm is not None:
        raise ValueError(
            f"--attention-backend zoomr does not support speculative decoding "
            f"(--speculative-algorithm {view.speculative_algorithm}); drop it or choose another backend"
        )
    if view.enable_mixed_chunk:
        raise ValueError("--attention-backend zoomr does not support --enable-mixed-chunk; drop that flag")
    if view.disaggregation_mode != "null":
        # A decode server would get the prompt's KV without zoomr's prefill (no thoughts, no index keys).
        raise ValueError(
            f"--attention-backend zoomr does not support PD disaggregation (--disaggregation-mode "
            f"{view.disaggregation_mode}); serve prefill and decode in one server (allowed: null, the default)"
        )
    if server_args.enable_dp_attention:  # (the resolved view does not carry it)
        # Untested on CUDA; SGLang's CPU engine pads DP batches through a backend method zoomr lacks.
        raise ValueError("--attention-backend zoomr does not support --enable-dp-attention; use --dp-size N "
                         "without it (each DP rank then keeps its own selection) or --tp N")
    from sglang.srt.environ import envs

    for flag in ("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "SGLANG_ENABLE_OVERLAP_PLAN_STREAM"):
        if getattr(envs, flag).get():
            # Both would replay or move ZoomR's host-planned metadata without its planning.
            raise ValueError(f"--attention-backend zoomr does not support {flag}=1; unset it")
    cfg = resolving_view(server_args)
    graphs = cfg.cuda_graph_config
    if view.device == "cpu":  # SGLang's CPU graph runner compiles the forward: not ZoomR's host plan
        graphs = with_phase(graphs, Phase.DECODE, backend=Backend.DISABLED)
        declare_resolution(server_args, "zoomr_plugin",
                           cuda_graph_config=with_phase(graphs, Phase.PREFILL, backend=Backend.DISABLED))
        return
    explicit = getattr(server_args, "_cuda_graph_config_locked", set())
    problem = graph_mode_problem(prefill == BACKEND_NAME, graphs.decode.backend, graphs.prefill.backend,
                                 prefill_explicit=(Phase.PREFILL, "backend") in explicit)
    if problem:
        raise ValueError(problem)
    if prefill == BACKEND_NAME and graphs.prefill.backend != Backend.DISABLED:
        # SGLang's default prefill graph, not asked for: zoomr's prefill runs eagerly (see graph_mode_problem).
        declare_resolution(server_args, "zoomr_plugin",
                           cuda_graph_config=with_phase(graphs, Phase.PREFILL, backend=Backend.DISABLED))


def graph_mode_problem(zoomr_prefill: bool, decode_graph: str, prefill_graph: str, *, prefill_explicit: bool) -> str:
    """Why a CUDA-graph mode cannot run with zoomr ("" when it can).

    Decode: zoomr loads its host plan in SGLang's full-graph replay hooks; a breakable graph replays
    the attention pieces without them. Prefill: a prefix whose cold thoughts are in the host tier is
    attended per request in PyTorch (``extend_holes.py``), which no prefill graph can replay; only
    a prefill graph the user asked for is refused, SGLang's default one is turned off.
    """
    if decode_graph not in ("full", "disabled"):
        return (f"--cuda-graph-backend-decode {decode_graph}: zoomr replays decode steps as full CUDA graphs only; "
                f"allowed: full (the default) or disabled")
    if zoomr_prefill and prefill_explicit and prefill_graph != "disabled":
        return (f"--cuda-graph-backend-prefill {prefill_graph} with zoomr as the prefill backend: zoomr's prefill over "
                f"cold thoughts cannot replay in a CUDA graph; use --disable-prefill-cuda-graph, or "
                f"--prefill-attention-backend flashinfer --decode-attention-backend zoomr")
    return ""


def after_compute_cell_size(cell_size, configurator, kvc, num_layers, *args, **kwargs):
    """zoomr as the decode backend with the automatic index size: each pool token also costs its
    share of the index store (``index_entries`` set by hand is a fixed size on top)."""
    from sglang.srt.arg_groups.overrides import attention_backends_of

    if attention_backends_of(kvc.server_args)[1] != BACKEND_NAME or not cell_size:
        return cell_size
    from sglang.srt.runtime_context import get_parallel

    from zoomr_sglang.attention_backend.factory import index_bytes_per_pool_token
    from zoomr_sglang.config import load_config

    if load_config().index_entries:
        return cell_size
    model_config = kvc.model_config
    kv_heads = model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    return cell_size + int(-(-index_bytes_per_pool_token(num_layers, kv_heads, model_config.head_dim) // 1))
