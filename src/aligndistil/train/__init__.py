"""The one training loop, the method registry and the teacher cache."""
