"""mixdit.ui."""
