"""Backends that run the time loop of one layer and direction, behind :mod:`rnnkit.ops.dispatch`."""
