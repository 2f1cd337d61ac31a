"""The workers: job -> blobs -> hashes -> matches -> actions (DESIGN §5). ``jobs``: the work
items from the reader; ``processor``: one job end to end, its containment and retries;
``actions``: a match to Ozone events, each at most once."""
