"""Policy search: hardware profile, cost model of the engine's block schedule, LP search (pulp)."""
