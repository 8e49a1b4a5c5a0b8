"""Per-photo signals: small units that each extract one value from a decoded photo.

A signal (`base.Signal`) declares its name and version, what it extracts from the decoded RGB
image (and the file), how its value is stored (bytes or JSON) and how two values compare (the
hook a query engine calls to search or filter by it). `registry.REGISTERED` lists the signals
every `loupe index` runs, one line each. The runner runs them in the same decode pass as the
embedding, on the picture before the model's preprocess; values are stored in the catalog keyed
by (content hash, signal name, signal version), so a new or upgraded signal runs only itself on
photos already indexed.
"""
