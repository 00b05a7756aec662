"""napari room (see DESIGN.md)."""
