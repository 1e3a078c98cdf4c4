"""Baseline models evaluated in the same harness as OxygenREC."""
