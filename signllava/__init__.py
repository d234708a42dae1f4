"""Internals of the Sign LLaVA trainer. The commands and the card's modules (data.py, model.py,
training.py) live at the repository root; nothing in this package imports them."""
