"""Faust table definitions and their small helpers."""
