"""The query engine: the query language, query vectors, ranking with filters, paging and collapse."""
