"""Entry point of the ``sglang.srt.plugins`` group: registers ``--attention-backend zoomr`` and
``--radix-cache-backend zoomr`` (``radix_ext``).

``register()`` only registers, importing no more of the package than ``runtime.py``: the backend,
the tree and the host-tier hooks load in their factories and at a hook's first call
(``_deferred``), so processes that build no backend never load them. It uses SGLang's extension
points: the attention registry and its CLI choices, a resolution hook (checks the ``ZOOMR_*``
settings and the server arguments at start: ``server_checks.py``), and ``HookRegistry`` hooks:

- a request took or left a pool row (``ReqToTokenPool.alloc`` / ``free_rows`` / ``clear``);
- a decode step is about to run (``ModelRunner.forward``): ZoomR plans it on the host from the
  batch's request ids and host sequence lengths, before any attention metadata is built;
- a decode step may replay a CUDA graph (``DecodeCudaGraphRunner.can_run_graph``) unless it has
  per-layer host work (baseline observers, self-checks, fidelity);
- ZoomR's counters join the scheduler's internal state (``/server_info``, ``Engine.get_server_info``).
"""

from __future__ import annotations

import importlib

from zoomr_sglang.runtime import runtime_of

BACKEND_NAME = "zoomr"

_registered = False


SGLANG_VERSION = "0.5.23"  # the SGLang these hooks' targets were read from (pyproject pins it)


def _deferred(module: str, name: str):
    """A hook that imports ``module`` at its first call and hands every call to its ``name``."""
    function = None

    def hook(*args, **kwargs):
        nonlocal function
        if function is None:
            function = getattr(importlib.import_module(module), name)
        return function(*args, **kwargs)

    hook.__qualname__ = f"{module}.{name}"
    return hook


def _hook_table():
    """Every ``HookRegistry`` hook of the plug-in: ``(target, hook, kind)``."""

    def host_tier(name: str):
        return _deferred("zoomr_sglang.host_tier_hooks", name)

    admission = "sglang.srt.managers.schedule_policy.PrefillAdder."
    return (
        ("sglang.srt.managers.schedule_batch.release_req", _deferred("zoomr_sglang.radix_ext.tree", "before_release_req"),
         "BEFORE"),
        ("sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.log_stats",
         _deferred("zoomr_sglang.metrics", "after_log_stats"), "AFTER"),
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
         _deferred("zoomr_sglang.server_checks", "after_compute_cell_size"), "AFTER"),
        # The host tier leaves holes in running requests' rows; SGLang's release path and admission
        # learn about them here (zoomr_sglang/host_tier_hooks.py).
        ("sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.checkpoint", host_tier("around_checkpoint"),
         "AROUND"),
        ("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row", host_tier("around_free_kv_row"), "AROUND"),
        ("sglang.srt.managers.schedule_batch.ScheduleBatch.new_tokens_required_next_decode",
         host_tier("after_new_tokens_required"), "AFTER"),
        # Admission goes through the prefill budget the allocator makes for each PrefillAdder; the
        # adder hooks hand it what that budget is never given (host_tier_hooks.py says why).
        ("sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.create_prefill_budget",
         host_tier("around_create_prefill_budget"), "AROUND"),
        (admission + "_get_running_request_total_token_offset", host_tier("after_running_offset"), "AFTER"),
        (admission + "add_one_req", host_tier("around_admitting"), "AROUND"),
        (admission + "add_chunked_req", host_tier("around_admitting"), "AROUND"),
        ("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", host_tier("before_prefill_batch"), "BEFORE"),
        ("sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._get_total_uncached_sizes",
         host_tier("after_uncached_sizes"), "AFTER"),
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
    register_resolution_hook("handle_attention_backend_compatibility")(
        _deferred("zoomr_sglang.server_checks", "resolve_server_args"))
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

    check_hooks_applied()  # a hook SGLang could not apply stops the backend here, naming it
    return create_zoomr_backend(model_runner)


def _create_radix_cache(ctx):
    from zoomr_sglang.radix_ext.tree import create_zoomr_radix_cache

    return create_zoomr_radix_cache(ctx)


def _after_free_rows(result, pool, indices, *args, **kwargs):
    runtime = runtime_of(pool)
    if runtime is not None:
        for row in indices:
            runtime.controller.release_row(row)
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
    runtime = runtime_of(pool)
    if runtime is not None and result is not None:
        for req, row in zip(reqs, result):
            runtime.controller.note_request(row, req)
    return result


def _before_forward(model_runner, forward_batch, *args, **kwargs):
    """Plan a decode step on the host before its metadata is built (eager or graph replay alike)."""
    if forward_batch.forward_mode.is_decode():
        runtime = runtime_of(model_runner.req_to_token_pool)
        if runtime is not None:
            controller = runtime.controller
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
    runtime = runtime_of(graph_runner.model_runner.req_to_token_pool)
    if runtime is not None and runtime.controller.needs_eager():
        return False
    return original(graph_runner, forward_batch, *args, **kwargs)


def _after_pool_clear(result, pool, *args, **kwargs):
    runtime = runtime_of(pool)
    if runtime is not None:
        runtime.controller.release_all()
    return result


RANK_COUNTS = ("pools", "radix", "host_tier", "index_entries_live", "running")  # per rank with TP > 1


def _add_internal_state(result, state_controller, *args, **kwargs):
    scheduler = state_controller.scheduler
    runtime = runtime_of(scheduler.req_to_token_pool)
    if runtime is not None:
        stats = runtime.controller.stats()
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
        if scheduler.tp_size > 1:  # every rank answers this request; rank 0's reply carries each rank's counts
            import torch.distributed as dist

            stats["ranks"] = [None] * scheduler.tp_size
            counts = {key: stats[key] for key in RANK_COUNTS if key in stats}
            dist.all_gather_object(stats["ranks"], counts, group=scheduler.tp_cpu_group)
        result.internal_state[BACKEND_NAME] = stats
    return result
