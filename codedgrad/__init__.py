"""codedgrad."""
