"""Integrations with other libraries. Import them explicitly (``longattn.integrations.hf``)."""
