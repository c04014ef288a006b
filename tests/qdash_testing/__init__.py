"""Test helpers: real collector processes and worker processes."""
