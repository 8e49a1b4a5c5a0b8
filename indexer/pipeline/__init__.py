"""The indexing pipeline: sources -> read+decode -> embed + signals -> commit, run by one loop on an executor."""
