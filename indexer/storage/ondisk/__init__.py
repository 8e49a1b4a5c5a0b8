"""Indices larger than memory: IVF lists in one memory-mapped file, built from embedding shards
(clip-retrieval's layout) or from a catalog's vectors.

For a collection whose float vectors do not fit in RAM (10M x 512 float32 is 20 GB), nothing
here ever holds more than one batch of them:

1. train: an IVF coarse quantizer and a product quantizer on a random sample of rows, read
   row by row with plain reads (`TRAIN_PER_LIST` rows per inverted list);
2. add: each npy shard is read in batches into its own small IVF block (codes only: 64 bytes
   per vector for PQ128), written to disk, then dropped; a block already written by an
   interrupted run is kept;
3. merge: the blocks' inverted lists are merged into one `OnDiskInvertedLists` file
   (`lists.ivfdata`, FAISS's merge_ondisk), which a search memory-maps: the kernel pages in
   the lists a query probes, and the index file itself holds only the quantizers;
4. search: probe the lists, take `rerank` candidates by their compressed codes, then score them
   exactly against the float vectors, read from the memory-mapped shards (a few hundred rows
   per query), so the ranking is exact among the candidates.

Ids are global row numbers: shard order, then row order within a shard, which is the order
of the shards' metadata rows, so a result maps back to its `image_path` directly.

A catalog's on-disk index (`loupe build-index` without shards) is built the same way over the
catalog's vectors, with catalog vector ids; its ondisk.json is its label (which catalog, which
generation, a digest of its ids), and the `Store` searches it instead of the FAISS file while it
is current.

Rooms: `layout` (file names, label, factory and probe choices), `sources` (the two row sources a
build reads: shards, a catalog), `build` (train, add, merge), `search` (open and query a built
index), `state` (is a catalog's on-disk index current, and what `loupe info`/`check` say of it).
"""
