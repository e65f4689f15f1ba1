"""Entry point of the ``sglang.srt.plugins`` group: registers ``--attention-backend zoomr`` and
``--radix-cache-backend zoomr`` (``radix_ext``).

``register()`` only registers; the backend module is imported lazily by its factory. It uses
SGLang's extension points: the attention registry and its CLI choices, a resolution hook (checks
the ``ZOOMR_*`` settings and the server arguments at start), and ``HookRegistry`` hooks:

- a request took or left a pool row (``ReqToTokenPool.alloc`` / ``free_rows`` / ``clear``);
- a decode step is about to run (``ModelRunner.forward``): ZoomR plans it on the host from the
  batch's request ids and host sequence lengths, before any attention metadata is built;
- a decode step may replay a CUDA graph (``DecodeCudaGraphRunner.can_run_graph``) unless it has
  per-layer host work (baseline observers, self-checks, fidelity);
- ZoomR's counters join the scheduler's internal state (``/server_info``, ``Engine.get_server_info``).
"""

from __future__ import annotations

BACKEND_NAME = "zoomr"

_registered = False


SGLANG_VERSION = "0.5.23"  # the SGLang these hooks' targets were read from (pyproject pins it)


def _hook_table():
    """Every ``HookRegistry`` hook of the plug-in: ``(target, hook, kind)``."""
    from zoomr_sglang import host_tier_hooks

    return (
        ("sglang.srt.managers.schedule_batch.release_req", _before_release_req, "BEFORE"),
        ("sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats", _after_log_stats, "AFTER"),
        ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows", _after_free_rows, "AFTER"),
        ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.clear", _after_pool_clear, "AFTER"),
        # Per-request policy settings: checked where the request enters (a bad value is the client's
        # error), handed to the backend when the request takes its pool row.
        ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", _before_validate_request,
         "BEFORE"),
        ("sglang.srt.mem_cache.memory_pool.ReqToTokenPool.alloc", _after_alloc_rows, "AFTER"),
        ("sglang.srt.model_executor.model_runner.ModelRunner.forward", _before_forward, "BEFORE"),
        ("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph",
         _around_can_run_graph, "AROUND"),
        ("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
         _add_internal_state, "AFTER"),
        # SGLang's per-token KV cost, before it sizes the pool: zoomr's index store is counted there.
        ("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
         _after_compute_cell_size, "AFTER"),
        # The host tier leaves holes in running requests' rows; SGLang's release path and admission
        # learn about them here (zoomr_sglang/host_tier_hooks.py).
        *host_tier_hooks.HOOKS,
    )


def register() -> None:
    global _registered
    if _registered:  # load_plugins() is idempotent per process; keep a direct second call harmless
        return
    _registered = True
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])  # takes an iterable of names
    register_attention_backend(BACKEND_NAME)(_create_backend)
    register_radix_cache_backend(BACKEND_NAME, _create_radix_cache)
    register_resolution_hook("handle_attention_backend_compatibility")(_resolve_server_args)
    for target, hook, kind in _hook_table():
        HookRegistry.register(target, hook, getattr(HookType, kind))


def check_hooks_applied() -> None:
    """Refuse to serve unless SGLang applied every hook of the plug-in.

    ``HookRegistry.apply_hooks`` logs a target it cannot patch (renamed or moved in another SGLang)
    and goes on; ZoomR without its release or admission hooks would corrupt the KV pool, so the
    backend stops the server instead. The registry records the targets it patched in ``_patched``
    (no public accessor in SGLang 0.5.23).
    """
    import sglang
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = [target for target, _, _ in _hook_table() if target not in HookRegistry._patched]
    if missing:
        raise RuntimeError(
            f"zoomr: SGLang did not apply the plug-in's hook on {missing[0]}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; zoomr-sglang is built for SGLang "
            f"{SGLANG_VERSION}, this is SGLang {sglang.__version__}: install sglang=={SGLANG_VERSION}"
        )


def _create_backend(model_runner):
    from zoomr_sglang.attention_backend.factory import create_zoomr_backend

    return create_zoomr_backend(model_runner)


def _create_radix_cache(ctx):
    from zoomr_sglang.radix_ext.tree import create_zoomr_radix_cache

    return create_zoomr_radix_cache(ctx)


def _after_compute_cell_size(cell_size, configurator, kvc, num_layers, *args, **kwargs):
    """zoomr as the decode backend with the automatic index size: each pool token also costs its
    share of the index store (``ZOOMR_INDEX_ENTRIES`` set by hand is a fixed size on top)."""
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


def _after_log_stats(result, collector, *args, **kwargs):
    from zoomr_sglang.metrics import after_log_stats

    return after_log_stats(result, collector, *args, **kwargs)


def _before_release_req(*args, **kwargs):
    from zoomr_sglang.radix_ext.tree import before_release_req

    return before_release_req(*args, **kwargs)


def _resolve_server_args(server_args, previous) -> None:
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


def _controller_of(req_to_token_pool):
    from zoomr_sglang.attention_backend.factory import controller_for_pool

    return controller_for_pool(req_to_token_pool)


def _after_free_rows(result, pool, indices, *args, **kwargs):
    controller = _controller_of(pool)
    if controller is not None:
        for row in indices:
            controller.release_row(row)
    return result


def _before_validate_request(manager, obj, *args, **kwargs):
    """Refuse a request whose ``custom_params`` carry a bad ``zoomr_*`` setting (ValueError: the
    client gets the message)."""
    sampling_params = getattr(obj, "sampling_params", None)
    custom_params = sampling_params.get("custom_params") if isinstance(sampling_params, dict) else None
    if isinstance(custom_params, dict) and any(str(k).startswith("zoomr_") for k in custom_params):
        from zoomr_sglang.config import load_config, request_settings

        request_settings(load_config(), custom_params)
    return None


def _after_alloc_rows(result, pool, reqs, *args, **kwargs):
    controller = _controller_of(pool)
    if controller is not None and result is not None:
        for req, row in zip(reqs, result):
            controller.note_request(row, req)
    return result


def _before_forward(model_runner, forward_batch, *args, **kwargs):
    """Plan a decode step on the host before its metadata is built (eager or graph replay alike)."""
    if forward_batch.forward_mode.is_decode():
        controller = _controller_of(model_runner.req_to_token_pool)
        if controller is not None:
            controller.begin_decode(forward_batch.rids, forward_batch.seq_lens_cpu.tolist())
            _abort(controller.next_plan.failed)
    return None


def _abort(failed) -> None:
    """Finish the requests whose step zoomr could not plan with their error (HTTP 500): the step
    runs (they attend every position), the scheduler and the other requests go on."""
    if not failed:
        return
    from http import HTTPStatus

    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    for req, message in failed:
        req.to_finish = FINISH_ABORT(message, HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")


def _around_can_run_graph(original, graph_runner, forward_batch, *args, **kwargs):
    controller = _controller_of(graph_runner.model_runner.req_to_token_pool)
    if controller is not None and controller.needs_eager():
        return False
    return original(graph_runner, forward_batch, *args, **kwargs)


def _after_pool_clear(result, pool, *args, **kwargs):
    controller = _controller_of(pool)
    if controller is not None:
        controller.release_all()
    return result


def _add_internal_state(result, state_controller, *args, **kwargs):
    scheduler = state_controller.scheduler
    controller = _controller_of(scheduler.req_to_token_pool)
    if controller is not None:
        stats = controller.stats()
        # SGLang's own pool counts, so that clients can check that nothing leaks.
        stats["pools"] = {
            "kv_available": int(scheduler.token_to_kv_pool_allocator.available_size()),
            "kv_evictable": int(scheduler.tree_cache.evictable_size()),
            "kv_protected": int(scheduler.tree_cache.protected_size()),
            "kv_capacity": int(scheduler.max_total_num_tokens),
            "req_rows_available": int(scheduler.req_to_token_pool.available_size()),
        }
        if hasattr(scheduler.tree_cache, "stats"):  # --radix-cache-backend zoomr
            stats["radix"] = scheduler.tree_cache.stats()
        result.internal_state[BACKEND_NAME] = stats
    return result
