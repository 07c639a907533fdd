"""memexp: what training a transformer costs in memory and time, and what checkpointing buys."""
