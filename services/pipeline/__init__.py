"""pipeline: each opportunity as an event-sourced aggregate moving through stages A–F."""
