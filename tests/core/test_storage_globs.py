"""Globs over object storage match what the same glob matches on a local disk (no server needed: the matcher
is given the listing a bucket returns)."""

from __future__ import annotations

import glob

import pytest

from slam_ray.core.storage import glob_match

FILES = ["ll/a.flac", "ll/b.wav", "ll/x/c.flac", "ll/x/y/d.flac", "ll/.hidden.flac", "ll/.cache/e.flac",
         "ll/x/notes.txt", "other/f.flac"]


@pytest.mark.parametrize("pattern", ["ll/**/*.flac", "ll/*.flac", "ll/*/*.flac", "ll/**", "ll/x/**/*.flac",
                                     "**/*.flac", "ll/[ab].*", "ll/x/*", "*/*.flac", "ll/**/x/*.flac"])
def test_a_bucket_glob_matches_what_a_local_glob_matches(tmp_path, pattern):
    """`s3://b/ll/**/*.flac` once dropped ll/a.flac (fnmatch wants a folder for `**/`) and `ll/*.flac` took
    ll/x/c.flac too (fnmatch's `*` crosses `/`)."""
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    local = sorted(p[len(str(tmp_path)) + 1:] for p in glob.glob(str(tmp_path / pattern), recursive=True)
                   if (tmp_path / p).is_file())
    assert sorted(f for f in FILES if glob_match(f, pattern)) == local
