"""Method presets (YAML), shipped inside the erase wheel."""
