"""The plan and what it expands to: typed plan sections, DVC stages, placement on work pools."""
