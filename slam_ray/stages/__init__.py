"""One module per stage, read top to bottom (generation is eval's step). No stage imports another; the
pipeline (slam_ray/pipeline.py) is the only place that lists them."""
