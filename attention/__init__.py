"""mixdit.attention."""
