"""`loupe serve`: the web server, its security rules, pictures, and the page (static/)."""
