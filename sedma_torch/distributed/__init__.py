"""Placeholder package; see DESIGN.md (filled by later issues)."""
