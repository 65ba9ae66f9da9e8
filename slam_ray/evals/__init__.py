"""Evaluation tasks without Ray: the task YAMLs (tasks/), the readers of benchmark layouts, the built-in grammar."""
