"""Prefect flows: thin orchestration over normalcy's stage functions (installed as normalcy.flows)."""
