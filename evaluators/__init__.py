"""Everything that turns images into numbers: feature extractors, Frechet distance, KID, reference statistics."""
