"""Pydantic models and Arrow schemas: the contracts between stages. Imports nothing else of ours."""
