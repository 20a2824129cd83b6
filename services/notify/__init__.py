"""notify: reminders, escalations, digests and recycling notices derived from opportunity events
and time."""
