"""Flower ClientApp of fedssl."""
