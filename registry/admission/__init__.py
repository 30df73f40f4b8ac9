"""Admission: reservations that book VRAM for a load in flight, so "fits" is a promise."""
