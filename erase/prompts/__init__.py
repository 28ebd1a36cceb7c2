"""Prompt catalogs (YAML), shipped inside the erase wheel."""
