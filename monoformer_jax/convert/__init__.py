"""Weight conversion between this project's params and other formats."""
