"""Unit tests of the state sources."""
