"""Everything that imports napari or Qt: readers, writers, sample data, widgets."""
