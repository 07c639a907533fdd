"""How each figure of a job is obtained: timed steps, one tracked memory step, saved bytes, FLOPs."""
