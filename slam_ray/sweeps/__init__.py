"""Sweeps: the search-space language, the Ray Tune driver, comparing runs. They sit beside the pipeline: they run it."""
