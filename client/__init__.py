"""A federation client: dials out, pulls tasks, trains on local data, pushes results."""
