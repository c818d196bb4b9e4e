"""Evaluation of trained students and the 7B memory dry-run."""
