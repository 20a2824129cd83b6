"""What every DealStream service shares: contracts, bus, store, settings, clock, auth."""
