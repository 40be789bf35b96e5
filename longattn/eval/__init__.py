"""Evaluation on real models and real text. Sits on top of the library; nothing imports it."""
