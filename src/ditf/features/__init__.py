"""DiTF feature extraction: preprocessing, the featurizer, and pure post-processing functions."""
