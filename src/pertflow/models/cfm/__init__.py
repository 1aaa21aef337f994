"""Gene-space conditional flow matching (the scDFM backbone)."""
