"""Flower ServerApp of fedssl."""
