"""Reading, filtering, saving and exporting the old kernel's memory."""
