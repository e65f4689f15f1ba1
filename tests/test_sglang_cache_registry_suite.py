"""SGLang's own radix-cache registry tests, with zoomr's plug-in loaded and, where a case builds a
cache, run on SGLang's ``RadixCache`` and on ``ZoomRRadixCache`` alike.

Source: the ``TestRegisterRadixCacheBackend`` and ``TestCreateTreeCacheRouting`` cases of
``test/registered/unit/mem_cache/test_registry.py`` (Apache-2.0, SGLang Team), read at
modal-projects/sglang@de1138e40e709dd7e20add2429bf5448dd6c6b57, a fork of sgl-project/sglang whose
selection chain is 0.5.23's (sgl-project/sglang's stored copy, f872abfd, predates the published
server-args bags 0.5.23 reads). Adapted where 0.5.23 differs, the same for both classes:

- a routed case builds a real cache of the class under test where SGLang's returns a MagicMock;
- 0.5.23's ``TreeCacheBuildContext`` has no ``effective_chunked_prefill_size``;
- 0.5.23 wraps no tree in a ``StreamingSession``: ``--enable-streaming-session`` refuses every tree
  but ``UnifiedRadixCache`` (``test_streaming_wrap_when_cache_does_not_support_it`` asserts that
  refusal; ``test_no_streaming_wrap_when_cache_supports_it`` has no 0.5.23 counterpart for either
  class and is not ported).

Added for zoomr: ``zoomr`` is among the registered names, and a second registration of it raises.
Not ported: the file's ``TestDefaultRadixCacheFactory`` (SGLang's built-in selection chain with
every cache class mocked out: neither class under test is built there).
"""

from __future__ import annotations

from unittest.mock import MagicMock, patch

import pytest
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.registry import (
    _RADIX_CACHE_REGISTRY,
    TreeCacheBuildContext,
    create_tree_cache,
    get_radix_cache_factory,
    register_radix_cache_backend,
    registered_radix_cache_backends,
)
from sglang.srt.runtime_context import get_context

import zoomr_sglang.plugin as zoomr_plugin
from zoomr_sglang.radix_ext.tree import ZoomRRadixCache


@pytest.fixture(autouse=True)
def registry_with_zoomr():
    """zoomr's plug-in loaded (``zoomr`` registered); registrations of a case do not leak."""
    if get_radix_cache_factory("zoomr") is None:
        zoomr_plugin.register()  # the entry point SGLang calls at start
    snapshot = dict(_RADIX_CACHE_REGISTRY)
    yield
    _RADIX_CACHE_REGISTRY.clear()
    _RADIX_CACHE_REGISTRY.update(snapshot)


@pytest.fixture(params=[RadixCache, ZoomRRadixCache], ids=["sglang", "zoomr"])
def cache_cls(request):
    return request.param


def real_cache(cls):
    return cls(CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=None, page_size=1))


@pytest.fixture
def make_ctx():
    overrides = []

    def make(*, backend=None, enable_streaming=False):
        override = get_context().override_server_args(
            radix_cache_backend=backend, enable_streaming_session=enable_streaming, enable_lmcache=False,
            enable_flexkv=False, enable_unified_cache_external_linker=False)
        override.install()
        overrides.append(override)
        return TreeCacheBuildContext(
            server_args=get_context().server_args, params=MagicMock(), is_hybrid_swa=False, is_hybrid_ssm=False,
            enable_hierarchical_cache=False, disable_radix_cache=False, tp_worker=MagicMock(),
            model_config=MagicMock(), tp_size=1, tp_rank=0, tp_group=MagicMock())

    yield make
    for override in reversed(overrides):
        override.restore()


def test_register_then_lookup():
    factory = MagicMock()
    register_radix_cache_backend("oss_unit_test", factory)
    assert get_radix_cache_factory("oss_unit_test") is factory
    assert "oss_unit_test" in registered_radix_cache_backends()
    assert "zoomr" in registered_radix_cache_backends()


def test_lookup_unknown_returns_none():
    assert get_radix_cache_factory("definitely_not_registered") is None


@pytest.mark.parametrize("name", ["", "   "], ids=["empty", "whitespace_only"])
def test_empty_or_whitespace_name_raises(name):
    with pytest.raises(ValueError):
        register_radix_cache_backend(name, MagicMock())


@pytest.mark.parametrize("name", ["dupe", "zoomr"])
def test_duplicate_registration_raises(name):
    if name == "dupe":
        register_radix_cache_backend(name, MagicMock())
    with pytest.raises(ValueError):
        register_radix_cache_backend(name, MagicMock())


def test_dispatches_to_registered_factory(cache_cls, make_ctx):
    cache = real_cache(cache_cls)
    factory = MagicMock(return_value=cache)
    register_radix_cache_backend("custom", factory)
    assert create_tree_cache(make_ctx(backend="custom")) is cache
    factory.assert_called_once()


def test_unknown_backend_raises(make_ctx):
    with pytest.raises(ValueError):
        create_tree_cache(make_ctx(backend="not_a_real_backend"))


def test_unset_backend_falls_back_to_default(cache_cls, make_ctx):
    cache = real_cache(cache_cls)
    with patch("sglang.srt.mem_cache.registry.default_radix_cache_factory", return_value=cache) as default_factory:
        assert create_tree_cache(make_ctx(backend=None)) is cache
    default_factory.assert_called_once()


def test_streaming_wrap_when_cache_does_not_support_it(cache_cls, make_ctx):
    register_radix_cache_backend("nonstreaming", MagicMock(return_value=real_cache(cache_cls)))
    with pytest.raises(NotImplementedError, match=cache_cls.__name__):
        create_tree_cache(make_ctx(backend="nonstreaming", enable_streaming=True))
