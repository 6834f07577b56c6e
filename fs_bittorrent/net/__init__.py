"""Real-network hosts for the sans-IO core (asyncio over TCP)."""
from .dataplane import DataPlanePeer, HostStats, connect_mesh, run_swarm

__all__ = ["DataPlanePeer", "HostStats", "connect_mesh", "run_swarm"]
