"""Methods that merge visual tokens inside the vision tower."""
