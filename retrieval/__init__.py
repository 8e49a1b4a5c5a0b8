"""loupe's query side: parse queries, rank results, filter them, and measure recall."""
