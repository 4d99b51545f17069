"""Adapters for training frameworks; each is an optional extra (``nbtrain[lightning]``)."""
