"""Hypothesis fuzzing of the parsers and the xDS request handling (issue 14)."""
