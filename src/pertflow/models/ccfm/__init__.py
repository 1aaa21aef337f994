"""CCFM: cascaded conditioned flow matching (SPEC 2.2)."""
