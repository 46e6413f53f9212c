"""Expert artifacts: manifest, weights, validation, references."""
