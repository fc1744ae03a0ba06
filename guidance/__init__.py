"""mixdit.guidance."""
