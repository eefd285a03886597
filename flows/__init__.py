"""Prefect flows: thin orchestration over the stage functions (installed as normalcy.flows)."""
