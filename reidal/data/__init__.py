"""Datasets: the procedural re-ID image generator and the WildlifeDatasets CSV loader."""
