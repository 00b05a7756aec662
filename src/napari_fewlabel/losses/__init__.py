"""losses room (see DESIGN.md)."""
