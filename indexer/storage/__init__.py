"""Storage: the SQL catalog (source of truth), its light reader, the FAISS vector files, locks and commits."""
