"""Treadle's AI layer on pydantic-ai and the providers' SDKs (the ``ai`` extra).

``treadle.ai.agents``: ``TreadleAgent`` / ``TreadleDurability``, durable pydantic-ai
agents in code workflows. ``treadle.ai.batches``: ``define_ai_batch_stage``, provider
batch APIs as batch stages. Nothing here is imported by ``import treadle``: the plain
install has no pydantic-ai.
"""
