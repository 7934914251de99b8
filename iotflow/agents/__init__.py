"""Thin Faust agents: each reads a topic and hands the decisions to plain functions."""
