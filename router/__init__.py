"""Prompt routing: frozen prompt encoder, architecture predictor, codes, optimal-transport assignment, losses."""
