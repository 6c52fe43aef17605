"""Medical Segmentation Decathlon tasks: locating, splitting, transforming, loading."""
