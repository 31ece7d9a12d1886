"""Thin click commands; the logic lives in the library modules they call."""
