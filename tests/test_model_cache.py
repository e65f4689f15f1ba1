"""Building a model folder into place: built once, reused, never seen half-written."""

from __future__ import annotations

import pytest

from testbed.model_cache import build_into_place, cache_root


def _complete(folder):
    return (folder / "done").is_file()


def test_builds_once_then_reuses(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "done").write_text("1")

    final = tmp_path / "cache" / "model"
    assert build_into_place(final, build, _complete) == final and _complete(final)
    assert calls[0] != final and calls[0].parent == final.parent  # built in a sibling, renamed
    assert build_into_place(final, build, _complete) == final and len(calls) == 1
    assert [p.name for p in final.parent.iterdir()] == ["model"]  # no temporary folder left


def test_incomplete_folder_is_replaced(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale").write_text("half")
    build_into_place(final, lambda folder: (folder / "done").write_text("1"), _complete)
    assert sorted(p.name for p in final.iterdir()) == ["done"]


def test_failed_build_leaves_nothing(tmp_path):
    def build(folder):
        (folder / "partial").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build_into_place(tmp_path / "model", build, _complete)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_follows_zoomr_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOOMR_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("ZOOMR_CACHE_DIR")
    assert cache_root().parts[-2:] == (".cache", "zoomr_sglang")
