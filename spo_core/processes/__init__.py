"""Stochastic processes a rollout steps through: each module holds one process's pure step maths."""
