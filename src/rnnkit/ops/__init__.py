"""Backends that run the time loop of one layer and direction, behind [`rnnkit.ops.dispatch`][]."""
