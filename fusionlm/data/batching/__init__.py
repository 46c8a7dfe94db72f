"""Batching: the stage's mixture drawn by a pure function of (seed, stage, step), padded or packed rows."""
