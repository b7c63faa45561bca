"""Inspection tools: attention maps and eviction traces, compiled decode memory, HLO checks, step profiles."""
