"""The live dashboard: its page (``dashboard.html``) and the in-process history it charts (``history``)."""
