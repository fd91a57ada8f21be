"""Reusable numerics with no model knowledge."""
