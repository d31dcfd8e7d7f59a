"""Write a saved image back into the old kernel's memory and resume it (krestore). Not implemented yet."""
