"""worldmodel package."""
