"""infer room (see DESIGN.md)."""
