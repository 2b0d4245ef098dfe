"""Inputs: reading and scanning prompt sources into work units; duplicate ids."""
