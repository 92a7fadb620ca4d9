"""Glue for training frameworks; each module imports its framework, so import it only if used."""
