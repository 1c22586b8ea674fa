"""The planner: moves workers between the prefill and decode roles against TTFT and ITL
targets (policy.py decides, window.py measures, kvmesh.actors.planner acts)."""
