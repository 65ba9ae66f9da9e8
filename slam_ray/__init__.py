"""slam_ray: a Ray-based experimentation platform for speech language models (the Slamming recipe)."""

__version__ = "0.1.0"
