"""train room (see DESIGN.md)."""
