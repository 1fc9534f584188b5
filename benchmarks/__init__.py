"""Repeatable measurements writing JSON + Markdown."""
