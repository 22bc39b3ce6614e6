"""Storage tiers of the offload connector: one module per tier (base.py: the interface), registry.py lists
them in order, planner.py is the scheduler side's plan over them."""
