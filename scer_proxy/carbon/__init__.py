"""Pure core: SCI arithmetic, the bundled grid table, embodied emissions, the per-request record."""
