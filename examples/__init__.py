"""Worked examples that use falconlm from the outside, as an application would (see each folder's README)."""
