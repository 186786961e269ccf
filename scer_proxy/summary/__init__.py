"""Pure aggregation of records into the /scer/summary shape, from the ledger or from Prometheus."""
